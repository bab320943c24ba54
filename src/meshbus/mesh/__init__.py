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

Wiring into the router (meshbus.amqp.interrouter and the core's rule 6):
- Inter-router connections (listener or connector role `inter-router`, with a `cost`) carry, attached by the
  connecting side, a control link each way (`_mesh/control`: protocol messages, pre-settled, one AMQP map
  body each, `message.to_dict()` / `messages.decode`) and a data link each way (`_mesh/data`), so a data
  backlog never delays a hello. The connection is the `Link`; `link_up` once both control links are open,
  `link_down` when the connection goes; a neighbour declared down while its connection is still open (it
  fell silent) has its connection aborted, so what was sent through it comes back to the producers at once.
- `tick(now)` runs at `next_tick()` on the event loop's monotonic clock.
- The router core's watcher calls `local_address_added` / `local_address_removed` for every address but
  dynamic (`_dynamic/<router-id>/...`, reached through the router id they contain) and `_mesh/` ones.
- `Outbox.routes_changed` -> `RouterCore.set_routes(routes, multicast)`; `addresses_changed` ->
  `RouterCore.remote_changed(address, routers)`; `report` -> one INFO log line (logger meshbus.mesh).
  Between routers a message carries its ingress router, trace and address in message annotations
  (meshbus.amqp.annotations), stripped before it leaves the mesh to a client.
"""
