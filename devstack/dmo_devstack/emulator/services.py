"""
Service cluster IPs: allocated from a configurable CIDR, immutable, released on deletion.

A free address is picked as kube-apiserver's allocator picks it (ipallocator's
``randomScanStrategyWithOffset``): at random from the upper band of the range, the
lower ``min(max(16, size/16), 256)`` addresses kept for static ``clusterIP``s and used
only once the upper band is full. So an address just released is seldom handed out
again at once (a lowest-free scan would hand it to the very next Service, while
kube-proxy may still route it to the old one).

The default CIDR is on loopback (127.1.0.0/16) so that a process kubelet can bind a
Service's address; ``clusterIP: None`` (headless) stays as it is.
"""
from __future__ import annotations

import ipaddress
import random
from typing import Any

from .errors import FieldError, go_repr


class ServiceIPs:
    """Cluster IP allocation (a mixin of ``KubeEmulator``)."""

    def _admit_service(self, old: dict[str, Any] | None, obj: dict[str, Any]) -> list[FieldError]:
        if old is None:
            obj.setdefault('status', {'loadBalancer': {}})  # as the API server returns it
        spec = obj.setdefault('spec', {})
        spec.setdefault('type', 'ClusterIP')
        spec.setdefault('sessionAffinity', 'None')
        for port in spec.get('ports') or []:
            port.setdefault('protocol', 'TCP')
            port.setdefault('targetPort', port.get('port'))
        if old is not None:
            old_ip = (old.get('spec') or {}).get('clusterIP')
            if not spec.get('clusterIP'):
                spec['clusterIP'] = old_ip
                spec['clusterIPs'] = [old_ip]
            elif spec['clusterIP'] != old_ip:
                return [FieldError('spec.clusterIPs[0]', 'FieldValueInvalid',
                                   f'Invalid value: {go_repr([spec["clusterIP"]])}: may not change once set')]
            return []
        if spec.get('clusterIP') == 'None':
            spec['clusterIPs'] = ['None']
            return []
        network = ipaddress.ip_network(self.service_cidr)
        if spec.get('clusterIP'):
            if spec['clusterIP'] in self._allocated_ips:
                return [FieldError('spec.clusterIPs', 'FieldValueInvalid',
                                   f'Invalid value: {go_repr([spec["clusterIP"]])}: failed to allocate IP '
                                   f'{spec["clusterIP"]}: provided IP is already allocated')]
        else:
            free = next_free_ip(network, self._allocated_ips)
            if free is None:
                return [FieldError('spec.clusterIPs', 'FieldValueInvalid', 'Invalid value: []: range is full')]
            spec['clusterIP'] = free
        if ipaddress.ip_address(spec['clusterIP']) not in network:
            return [FieldError('spec.clusterIPs', 'FieldValueInvalid',
                               f'Invalid value: {go_repr([spec["clusterIP"]])}: failed to allocate IP '
                               f'{spec["clusterIP"]}: the provided IP ({spec["clusterIP"]}) is not in the valid '
                               f'range. The range of valid IPs is {self.service_cidr}')]
        spec['clusterIPs'] = [spec['clusterIP']]
        return []  # allocated when stored (see _create), released on deletion


def next_free_ip(network: ipaddress.IPv4Network | ipaddress.IPv6Network, allocated: set[str]) -> str | None:
    """A free host address of ``network``: from a random start in the upper band, else in the lower."""
    first = int(network.network_address) + 1
    size = network.num_addresses - 2  # without the network and broadcast addresses
    offset = min(max(16, size // 16), 256, size)
    for low, high in ((offset, size), (0, offset)):
        if high <= low:
            continue
        start = random.randrange(low, high)
        for i in range(high - low):
            ip = str(ipaddress.ip_address(first + low + (start - low + i) % (high - low)))
            if ip not in allocated:
                return ip
    return None
