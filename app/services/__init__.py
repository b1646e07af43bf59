"""The service layer: registry (models, versions), jobs (the queue), predict; routers call only these."""
