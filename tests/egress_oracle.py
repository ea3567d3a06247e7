#!/usr/bin/env python3
"""What Python's ipaddress module says about addresses, for the egress guard's oracle test
(src/delivery/egress.rs). Reads one address a line on stdin; writes one JSON object a line:
the address's own properties and, when it embeds an IPv4 address (IPv4-mapped, 6to4,
NAT64 64:ff9b::/96, IPv4-compatible ::/96 but :: and ::1), that address's properties.
The first line names the Python version. After the addresses read, it adds its own: the
ends, middle and neighbours of every special network Python's tables know, and their
IPv6 embeddings, so a range the guard lacks is probed too."""

import ipaddress
import json
import sys

NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def props(a):
    return {
        "addr": str(a),
        "is_global": a.is_global,
        "is_private": a.is_private,
        "is_multicast": a.is_multicast,
        "is_site_local": getattr(a, "is_site_local", False),
    }


def embedded(a):
    """The embedded IPv4 address and how, computed here rather than taken from the guard."""
    if a.version != 6:
        return None
    if a.ipv4_mapped is not None:
        return "mapped", a.ipv4_mapped
    if a.sixtofour is not None:
        return "6to4", a.sixtofour
    if a in NAT64:
        return "nat64", ipaddress.IPv4Address(int(a) & 0xFFFFFFFF)
    if int(a) >> 32 == 0 and int(a) > 1:
        return "compatible", ipaddress.IPv4Address(int(a))
    return None


def python_networks():
    """The networks in ipaddress's own constant tables (their names vary by version)."""
    for constants in (ipaddress._IPv4Constants, ipaddress._IPv6Constants):
        for value in vars(constants).values():
            for one in value if isinstance(value, list) else [value]:
                if isinstance(one, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                    yield one


def own_samples():
    seen = set()
    for net in python_networks():
        first, last = int(net.network_address), int(net.broadcast_address)
        top = 2**net.max_prefixlen - 1
        for n in (first, last, (first + last) // 2, first - 1, last + 1):
            if 0 <= n <= top:
                a = ipaddress.IPv6Address(n) if net.version == 6 else ipaddress.IPv4Address(n)
                seen.add(a)
                if a.version == 4:
                    v4 = int(a)
                    for v6 in ((0xFFFF << 32) | v4, v4, (0x64FF9B << 96) | v4, (0x2002 << 112) | (v4 << 80) | 1):
                        seen.add(ipaddress.IPv6Address(v6))
    return sorted(seen, key=lambda a: (a.version, int(a)))


def answer(a, source):
    out = props(a)
    out["input"] = str(a)
    out["source"] = source
    inner = embedded(a)
    if inner is not None:
        out["embedding"] = inner[0]
        out["embedded"] = props(inner[1])
    print(json.dumps(out))


def main():
    print(json.dumps({"python": sys.version.split()[0]}))
    for line in sys.stdin:
        line = line.strip()
        if line:
            answer(ipaddress.ip_address(line), "stdin")
    for a in own_samples():
        answer(a, "python")


if __name__ == "__main__":
    main()
