"""The control plane: the cluster view, scaling transitions (Celery remote control), the host
agent that starts replica processes, and the autoscaler."""
