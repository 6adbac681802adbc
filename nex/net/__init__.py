"""Host networking for machines: namespaces, veth pairs, address leases."""
