"""Which hop addresses a seed or a route is refused for as the replica's own sync plane
(syncplane/own.py)."""

from __future__ import annotations

import pytest

from inference_service.syncplane.own import is_own, split


def test_split_takes_the_port_off_the_last_colon() -> None:
    assert split("127.0.0.1:9001") == ("127.0.0.1", 9001)
    assert split("[::1]:9001") == ("::1", 9001)
    assert split("replica4:9001") == ("replica4", 9001)
    assert split("replica4") == ("replica4", None)
    assert split("replica4:http") == ("replica4:http", None)


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
    ],
)
def test_a_hop_is_this_replica_only_on_its_port_and_one_of_its_addresses(
    address: str, listen: str, own: bool
) -> None:
    assert is_own(address, listen, 9001) is own
