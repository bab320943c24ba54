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
    Only durable messages are delivered. Per group, messages made available again come first (lowest
    offset first), then new ones in append order. accepted finishes the message for the group; released,
    modified, and a consumer detaching with the message unsettled make it available again with the
    delivery count raised; rejected, or a count reaching `max_deliveries`, moves it (for that group) to the
    queue's `dead_letter` address, itself a queue of the same store (without one it is dropped and
    counted). A message is deleted when every group has finished it, or when it expires: an expired message
    is never delivered (`expire(now)` purges; one in flight goes when settled).

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
    message only then. A write that fails (disk full) is rolled back whole and the engine refuses later
    ones (`EngineFailed`, naming the file and the next step): restart to recover the last good batch.

Recovery
    `Store.open` reads back queues, groups, marks and each message's offset, deadline and size (not the
    payloads) and rebuilds the queues: 1,000,000 messages in about 2 s here (bench/README.md). What a group
    had been handed out (below its saved cursor) and not finished is available again with its delivery
    count raised by one. Nothing whose acceptance was durable is delivered to that group again; nothing
    reported durable is lost (tests/store/test_crash.py kills a writer with SIGKILL in a loop).

How the router will use it (a queue address served by a store link)
    The router knows from its configuration which addresses are queues and gives the store their limits
    (`limits(address) -> QueueLimits`). It routes to the store what producers send to a queue address and
    the attaches of consumers to one; the store's outcomes become the producer's:
    - a producer's delivery: `store.append(address, payload, deadline, now, token=delivery)`; on
      `QueueFull` settle it rejected (amqp:resource-limit-exceeded, str(error)); False (already expired):
      the router's expired outcome; `EngineFailed`: rejected amqp:internal-error with its message. A
      producer link's credit is capped by `store.producer_credit(address, capacity)`, reviewed after each
      commit.
    - the commit task: `batch = store.seal()`; `await loop.run_in_executor(writer, store.write, batch)`;
      for each token of `store.completed(batch)` settle the producer's delivery accepted (or give the
      consumer's settlement back, below); then send `store.deliveries(now)`.
    - a consumer's attach: `store.attach(address, link, pool)`; its flow: `store.flow(link, credit)`; each
      `Outgoing` of `store.deliveries(now)` is sent on its link (`count` becomes the header's
      delivery-count) and remembered by delivery handle -> offset; its outcome:
      `store.settle(link, offset, Settlement.X, now, token)` (with receiver-settle-mode second the router
      settles back once the token shows the acknowledgement durable); its detach: `store.detach(link, now)`.
    - the router's timer: `store.expire(now)`, rearmed at `store.next_deadline()`.
"""
