"""ONNX Runtime on the serving side: what a session expects (signature) and which sessions stay loaded."""

from app.runtime.sessions import LoadedSession, SessionCache
from app.runtime.signature import TensorSpec, signature_of

__all__ = ["LoadedSession", "SessionCache", "TensorSpec", "signature_of"]
