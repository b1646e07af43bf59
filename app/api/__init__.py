"""HTTP routers: parse, validate, call a service, encode. Errors are mapped in app/api/errors.py."""
