"""Durable queues: store-and-forward for the addresses configured as queues (issue 6).

Modules: `queue` (the logic of one queue address: no file, socket, thread or clock), `engine` (SQLite in WAL
mode, group commit, recovery), `store` (the facade the router calls: queues by address plus their engine).

Data model
    A queue address is an append-only log: each message gets the queue's next offset (never reused, kept
    across restarts). On disk a message is one row keyed `queue id << 40 | offset` (deadline, size, payload);
    groups keep their start offset and a cursor; a mark row per (message, group) records a delivery count
    or that the group finished the message while other groups still need it. In memory a queue holds each
    retained message's offset, size, deadline and, while `cache_bytes` allows, its payload; the rest is read
    back from the file when delivered.

Groups (subscriptions)
    Consumers attach with a pool name (the oslo listener `pool`; none: the default group ""). Each group
    receives every message appended from its start, with its own cursor (as Kafka's consumer groups: no
    copies); members of a group share the messages, taking turns within their credit. The first group of a
    queue starts at the oldest retained message, so notifications sent before any listener existed are
    delivered to the first one; a group created while others exist starts at the tail (it receives what is
    sent from then on, as a pool's queue bound later would). A group outlives its consumers (a restarting
    listener misses nothing) until it is dropped (`Store.drop_group`, for management).

Delivery and settlement
    A message is delivered as soon as it is appended while its payload is in memory (`cache_bytes`), else
    once it is durable (it is read back from the file). Per group, messages made available again come
    first (lowest offset first), then new ones in append order. accepted finishes the message for the
    group; released, modified, and a consumer detaching with the message unsettled make it available again
    with the delivery count raised; rejected, or a count reaching `max_deliveries`, moves it (for that
    group) to the queue's `dead_letter` address, itself a queue of the same store (without one it is
    dropped and counted). A message is deleted when every group has finished it, or when it expires: an
    expired message is never delivered (`expire(now)` purges; one in flight goes when settled). One deleted
    before its append was written is never written: listeners that keep up cost the disk only the commits.

Limits
    Per queue `max_depth` messages and `max_bytes` payload bytes. When full the store refuses the new message
    with `QueueFull` (condition amqp:resource-limit-exceeded, a description naming the queue and the limit):
    never a silent drop. Flow control: `producer_credit(address, wanted)` caps a producer's credit by the
    queue's room and gives none while more than 64 MiB wait for a commit, so a fast producer can exhaust
    neither memory nor disk.

Durability and group commit
    Every change is recorded in the engine's open batch as it happens; `seal` closes the batch and `write`
    commits it in one transaction with one fsync (`synchronous=FULL`), on a writer thread or inline; while
    one batch is written the next fills, so batches grow with the load. A token passed with an append or a
    settlement comes back from `completed(batch)` once it is durable: the router accepts a producer's
    message only then, even when a consumer had it earlier (after a crash before that, the producer sends
    it again: at least once). A write that fails (disk full) is rolled back whole and the engine refuses later
    ones (`EngineFailed`, naming the file and the next step): restart to recover the last good batch.

Recovery
    `Store.open` reads back queues, groups, marks and each message's offset, deadline and size (not the
    payloads) and rebuilds the queues: 1,000,000 messages in about 2 s here (bench/README.md). What a group
    had been handed out (below its saved cursor) and not finished is available again with its delivery
    count raised by one. Nothing whose acceptance was durable is delivered to that group again; nothing
    reported durable is lost (tests/store/test_crash.py kills a writer with SIGKILL in a loop).

How the router uses it (`endpoint`: plain code; meshbus.amqp.storehost: its asyncio side)
    The configuration's [[queue]] rules say which addresses are queues (built in: every oslo notification
    address) and their limits; every router of a mesh has the same rules, and a router with [store]
    enabled stores their queues. The router core (its rule 8) and the endpoint between them:
    - a queue address X that gets an entry on the router is consumed by the endpoint's own link on X: a
      producer's delivery is appended (`store.append(X, payload, deadline, now, token=(link, delivery))`)
      and accepted once its batch is written; QueueFull: rejected amqp:resource-limit-exceeded with
      str(error); already expired: the router's expired outcome; EngineFailed: rejected
      amqp:internal-error. That link's credit is `store.producer_credit(X, ...)` (a full queue still gets
      credit, so that what is sent is refused rather than left waiting), reviewed after each commit.
    - a client's receiving link on X with pool P is attached to `_queue/<P>/X`; while that address is
      reachable (consumers here or elsewhere in the mesh) the endpoint feeds it through a producer link of
      its own, attached to the store's group P of X (`store.attach`); the core's credit for it is the
      group's (`store.flow`); each `Outgoing` of `store.deliveries(now)` is delivered with its count in the
      header's delivery-count (`header.with_delivery_count`, proton's codec); the consumer's outcome is
      `store.settle(...)`; the address becoming unreachable detaches it (`store.detach`).
    - the group commit: `batch = store.seal()`; `store.write(batch)` on the writer thread; then the
      tokens of `store.completed(batch)` are accepted and `store.deliveries(now)` sent. A timer at
      `store.next_deadline()` runs `store.expire(now)`.
    - in a mesh, a router that stores a rule's queues consumes `_store/<rule key>` too; elsewhere the
      routers advertising it are the remote routers of the rule's queue addresses, so what is sent there is
      forwarded to a store. Each message lives in the store that took it; every store serves the
      consumers (a sharded queue).
"""
