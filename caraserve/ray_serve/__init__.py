"""Scale-out on Ray Serve: engine replicas as a Ray Serve deployment (replica.py), the routing
policies of caraserve.cluster.policies as a Ray Serve request router (request_router.py), an
OpenAI-compatible ingress over them (ingress.py), the application and the local Ray instance
(app.py), `python -m caraserve.ray_serve` (__main__.py)."""
