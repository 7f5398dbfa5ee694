"""The local runtime: a real Kubernetes control plane and process-backed nodes on one machine.

No Docker and no cloud: the control-plane binaries are built from Go modules, and pods run as
local processes in the current Python environment.
"""
