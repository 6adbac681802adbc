"""Firecracker: its API's request bodies and a client for its API socket (:mod:`.api`).

The driver that uses them is :mod:`nex.vm.drivers.firecracker`.
"""
