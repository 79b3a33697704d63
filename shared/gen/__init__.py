"""Generated protobuf and gRPC code (do not edit: run `make proto`).

Every generated module registers its descriptors in POOL, a pool of this package's own, rather than
protobuf's default pool. The OIP messages live in the `inference` proto package, as the protocol
requires, and so do the ones inside tritonclient; in one shared pool the two sets collide
("duplicate symbol 'inference.ServerLiveRequest'") and a user could not import our client or
server next to tritonclient. A private pool keeps both importable in one process.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
