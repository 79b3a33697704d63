"""Which hop addresses a seed or a route is refused for as the replica's own sync plane
(syncplane/own.py)."""

from __future__ import annotations

import pytest

from inference_service.syncplane.own import address_problem, is_own, split


def test_split_takes_the_port_off_the_last_colon() -> None:
    assert split("127.0.0.1:9001") == ("127.0.0.1", 9001)
    assert split("[::1]:9001") == ("::1", 9001)
    assert split("replica4:9001") == ("replica4", 9001)
    assert split("replica4") == ("replica4", None)
    assert split("replica4:http") == ("replica4:http", None)
    assert split("replica4:\uff19\uff10") == ("replica4:\uff19\uff10", None)  # not ASCII digits


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1:9001", None),
        ("[::1]:65535", None),
        ("replica4:1", None),
        ("127.0.0.1:75537", "'127.0.0.1:75537' names port 75537, outside 1 to 65535"),
        ("127.0.0.1:0", "'127.0.0.1:0' names port 0, outside 1 to 65535"),
        ("replica4", "'replica4' is not HOST:PORT"),
        (":9001", "':9001' is not HOST:PORT"),
        ("not an address", "'not an address' is not HOST:PORT"),
        # gRPC reads a scheme, and the address after it: past every address comparison.
        (
            "ipv4:127.0.0.1:9001",
            "'ipv4:127.0.0.1:9001' is not HOST:PORT: 'ipv4:127.0.0.1' is not a host name or "
            "an IPv4 address (an IPv6 address goes in brackets)",
        ),
        (
            "dns:///replica4:1",
            "'dns:///replica4:1' is not HOST:PORT: 'dns:///replica4' is not a host name or an "
            "IPv4 address (an IPv6 address goes in brackets)",
        ),
        (
            "::1:9001",
            "'::1:9001' is not HOST:PORT: '::1' is not a host name or an IPv4 address "
            "(an IPv6 address goes in brackets)",
        ),
        ("[replica4]:1", "'[replica4]:1' is not HOST:PORT: [replica4] is not an IPv6 address"),
        ("inference_1:9001", None),  # compose names its containers so
    ],
)
def test_a_hop_address_is_a_host_and_a_port_grpc_dials_as_given(
    address: str, problem: str | None
) -> None:
    # gRPC dials a port past 65535 modulo 65536: another service's, past every address check.
    assert address_problem(address) == problem


@pytest.mark.parametrize(
    ("address", "listen", "own"),
    [
        ("127.0.0.1:9001", "127.0.0.1:0", True),
        ("localhost:9001", "127.0.0.1:0", True),  # a name for the address listened on
        ("127.0.0.1:9002", "127.0.0.1:0", False),  # another port: another service
        ("127.0.0.1:9001", "127.0.0.2:0", False),  # another address listened on, same port
        ("127.0.0.1:9001", "0.0.0.0:0", True),  # every local address is listened on
        ("192.0.2.1:9001", "0.0.0.0:0", False),  # TEST-NET-1: no address of this host
        ("no-such-host.invalid:9001", "0.0.0.0:0", False),
        ("127.0.0.1", "0.0.0.0:0", False),  # no port
        # Dialling the unspecified address connects to the loopback.
        ("0.0.0.0:9001", "127.0.0.1:0", True),
        ("[::ffff:0.0.0.0]:9001", "127.0.0.1:0", True),
        ("0.0.0.0:9001", "127.0.0.2:0", False),
        ("0.0.0.0:9001", "0.0.0.0:0", True),
    ],
)
def test_a_hop_is_this_replica_only_on_its_port_and_one_of_its_addresses(
    address: str, listen: str, own: bool
) -> None:
    assert is_own(address, listen, 9001) is own
