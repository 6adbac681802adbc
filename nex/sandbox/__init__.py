"""The sandbox of a process machine: the jail built around each workload, its limits and its checks.

- :mod:`.jail` builds the workload's jail in its init (namespaces, a root of its own, no
  capabilities, ``no_new_privs``, seccomp last), step by step, each failing closed;
- :mod:`.seccomp` compiles the syscall filter with libseccomp;
- :mod:`.cgroups` makes the per-machine cgroup (cgroup v1 or v2) that enforces the machine template;
- :mod:`.support` finds out, once per node, what this host lets the node apply.

The network fence is host networking and lives in :mod:`nex.net.fence`.
"""
