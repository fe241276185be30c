"""MNIST digit classifier service: a FastAPI app run by gunicorn with uvicorn workers."""
