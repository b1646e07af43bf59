"""Wire protocols: tensors on the wire <-> numpy. No model logic (that is app/services/predict.py)."""
