"""Run pods bound to this runtime's nodes as local processes, the way a kubelet runs containers.

The image is recorded, not pulled: commands run in the current Python environment. Volumes
become folders (ConfigMaps and Secrets written out, PVCs mapped to their PersistentVolume's
folder, emptyDirs created, memory-backed ones under /dev/shm), and every mount path that appears
in a container's command, args, env or working directory is rewritten to its folder. The pod
gets its own loopback address, and the cluster DNS names of the runtime's pods are replaced by
their addresses. Exit codes, restarts and phases are reported in the pod's status, as a kubelet
does, so Jobs, Deployments and the operator see what they would see in a cluster.

:class:`~kubetune_local.pods.runner.PodRunner` coordinates one pod; ``context`` holds what its
parts share, ``sources`` reads ConfigMaps, Secrets and downward-API fields, ``volumes`` makes the
folders, ``environment`` the process environment and command line, ``processes`` starts and
stops the processes, ``probes`` checks readiness and ``status`` writes the pod's status.
"""

from kubetune_local.pods.runner import PodRunner

__all__ = ["PodRunner"]
