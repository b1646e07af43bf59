"""The worker: a separate process that claims jobs from the database and runs the optimizer.

Each job runs in its own child process (app/worker/runner.py), so a crash or hang inside ONNX
Runtime or its quantization tools ends only that child; the worker marks the job failed with the
reason and takes the next one. The worker talks to the API only through the database and the
artifact store, so it can run on another machine (`onnxforge worker`).

Modules: loop (the worker's loop: claim, watch, publish), runner (the child), embedded (the worker
process the API starts and keeps alive), lifeline (children die with their parent). Nothing is
imported here, so that `python -m app.worker.runner` starts without loading the worker.
"""
