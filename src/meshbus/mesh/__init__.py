"""The routing protocol between meshbus routers: plain objects, no sockets, no clock.

One concern per module (each says what it must not do):
  messages.py   the protocol messages, frozen values to and from plain maps (AMQP map bodies)
  config.py     the timers (MeshConfig)
  events.py     what is reported to the operator's log; `Link`, the edge's opaque link handle
  hello.py      neighbour discovery and liveness over each inter-router link; duplicate router ids
  linkstate.py  each router's links and costs, versioned; the database; the flooding rule
  path.py       Dijkstra: costs and all equal-cost next hops; the multicast trees
  mobile.py     which addresses have consumers on which routers: incremental updates, resync, the view
  node.py       MeshNode ties them together behind the edge's events and the `Outbox`; RoutingTable

Protocol. Every message travels one hop, on an inter-router link; the mesh floods updates itself, so it
needs nothing from the forwarding layer but a control channel per link.
  HELLO (router id, instance, ids seen on this link)   every hello_interval on every link; two-way = neighbour
  LSU (origin, instance, seq, neighbour -> cost)       flooded when the origin's neighbours or costs change
  LSR (router ids)                                     asks a neighbour for its copies of those LSUs
  MAU (origin, instance, seq, added/removed | exist)   flooded when the origin's addresses change;
                                                       `exist`: the whole set, the answer to a MAR
  MAR (router ids)                                     asks a neighbour for those routers' whole address sets
  RA (per router: instance, ls_seq, mobile_seq)        the sender's summary of its database: to a new
                                                       neighbour at once, to all neighbours for the routers
                                                       that just became reachable, to each neighbour every
                                                       advertise_interval; the receiver asks for what it lacks
Versions are (instance, seq): the instance is the router process's start time in ns, so a restarted router
supersedes its previous life. A sequence gap in MAUs is repaired at once by a MAR to the neighbour that sent
the MAU; anything else missed (a lost update, a healed partition) by the RA exchange.

Timers (MeshConfig, seconds): hello_interval 0.5; hello_timeout 1.5 (a silent neighbour is dead after three
missed hellos; a closed connection at once); advertise_interval 4 (a safety net: updates are flooded at
once); batch_delay 0.01 (our own updates and the route computation wait this long so a burst goes as one);
request_timeout 1; purge_after 30 (an unreachable router's unchanged state is then forgotten).

Choices. A link counts only if both ends report it, at the larger of the two ends' costs: the graph is
symmetric, which the multicast trees need, and a cost set on one end only (the connector) holds. Ties go to
the lowest router id; every equal-cost next hop is exposed for the forwarding layer to rotate over. The
multicast tree of source S gives every router its canonical next hop toward S as parent: one Dijkstra per
neighbour, and each router gets exactly one copy. No cap on the number of routers. Measured here (tests'
random graphs, Python 3.11): a full route computation takes 17-32 ms for 1,000 routers (one Dijkstra
1.5-2.5 ms, so a router with d neighbours pays d + 1 of them); 200 simulated routers converge within 40 ms
of simulated time (hops of 0.5-2 ms), and again within 30 ms after one is killed.

Wiring into the router (the next step; this package does not do it):
- Inter-router connections (listener or connector role `inter-router`, with a `cost`): on each, the connector
  attaches a sender and a receiver with address `_mesh/control`, link-local (never in the address table).
  A protocol message is an AMQP message whose body is `message.to_dict()`, sent pre-settled; the edge turns
  bodies back with `messages.decode` (a MessageError is logged with the connection and the message dropped).
  Data between routers goes on other links (`_mesh/data`), so a data backlog never delays a hello.
- `MeshNode(router_id, instance=time.time_ns(), config, outbox, random.Random())`; the edge passes the
  connection as the `Link`: `link_up(link, cost, now)` once both control links are attached,
  `link_down(link, now)` when the connection closes or fails, `link_cost` on a reload, `handle(link,
  message, now)` per control message, `tick(now)` at `next_tick()` (loop.call_at, rescheduled after every
  call into the node), with `now` the loop's monotonic clock.
- The router core calls `local_address_added(address, now)` when an address gains its first local consumer
  and `local_address_removed` when it loses its last, except dynamic (`_dynamic/<router-id>/...`, reached
  through the router id they contain) and `_mesh/` addresses.
- The forwarding layer gets `Outbox.routes_changed(RoutingTable)`: per router its cost and equal-cost next
  hops (`link_to(router)` for the canonical one; the link per neighbour in `links`), and per source router
  the neighbours its multicast goes on to (`multicast_links(source)`, the source being the router where the
  message entered the mesh, carried in its annotations; while the mesh converges a router may drop copies
  that do not come from `routes[source].next_hops[0]`, and the trace stops loops).
  `Outbox.addresses_changed` gives, per address, the other routers with consumers (closest: lowest
  `routes[r].cost`; balanced: cost plus unsettled); an address whose set becomes empty has no remote
  consumers left, so producers lose their credit. `report` gives one log line per event (neighbour up/down,
  router reachable/unreachable, duplicate router id). `MeshNode.table`, `addresses()` and
  `known_routers()` are there for management.
"""
