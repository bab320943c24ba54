/*
 * meshbus router benchmark load clients, on proton-c's proactor and engine.
 *
 * One binary, one role per process (the first argument):
 *   send      sends -n messages of -s body bytes to -t, unsettled (counts accepted outcomes) or
 *             pre-settled (-p); keeps the link's credit fully used.
 *   recv      receives -n messages from -t with a credit window of -c; accepts each (settles
 *             pre-settled ones). With -l HOST:PORT it listens instead and takes whatever link a
 *             sender attaches: direct mode, the clients' own ceiling without a router.
 *   rpc-client  -n requests to service -t with -o outstanding; replies come back on a receiver
 *             with a dynamic source; records each round trip's latency.
 *   rpc-server  serves -n requests on -t; replies on an anonymous-relay sender to each reply_to.
 *   idle      opens -n AMQP connections (SASL ANONYMOUS + Open only) and holds them until stdin
 *             closes.
 *
 * Output on stdout, one flushed line each, for the driver (bench/router_bench.py) to parse:
 *   "listening on HOST:PORT", "ready" (links attached / connections open), "result k=v ...".
 * Times are CLOCK_MONOTONIC seconds, comparable across processes on this host.
 * Errors go to stderr. Exit status: 0 done, 1 usage, 2 AMQP or socket error, 3 timed out.
 * Every role stops by itself: -T bounds the whole run (except an idle holder's wait for stdin).
 */
#include <proton/codec.h>
#include <proton/condition.h>
#include <proton/connection.h>
#include <proton/delivery.h>
#include <proton/error.h>
#include <proton/event.h>
#include <proton/link.h>
#include <proton/listener.h>
#include <proton/message.h>
#include <proton/netaddr.h>
#include <proton/proactor.h>
#include <proton/sasl.h>
#include <proton/session.h>
#include <proton/terminus.h>
#include <proton/transport.h>

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

enum role { SEND, RECV, RPC_CLIENT, RPC_SERVER, IDLE };
static const char *const role_names[] = {"send", "recv", "rpc-client", "rpc-server", "idle"};

/* An encoded reply waiting for credit on the rpc server's anonymous sender. */
struct pending {
  struct pending *next;
  size_t size;
  char bytes[];
};

static struct {
  enum role role;
  const char *connect_addr, *listen_addr, *address;
  uint64_t count;
  size_t size;
  int credit, outstanding, timeout_s;
  bool presettled;

  pn_proactor_t *proactor;
  pn_listener_t *listener;
  pn_link_t *sender, *receiver;
  pn_message_t *msg;     /* outgoing message (rpc server: the request, turned into the reply) */
  pn_message_t *inbox;   /* rpc client: decoded reply */
  pn_rwbytes_t encoded;  /* send: the one pre-encoded message; rpc: scratch for encoding */
  size_t encoded_len;
  char *rbuf;            /* receive buffer, grown to the largest message seen */
  size_t rbuf_size, rbuf_have;

  uint64_t sent, settled, accepted, received, replied;
  double start, end;
  bool done;
  int open_transports, links_ready;

  /* rpc client */
  char *reply_to;
  uint64_t in_flight;
  double *sent_at;   /* per request id */
  double *latencies; /* per completed round trip, seconds */

  /* rpc server */
  struct pending *queue_head, *queue_tail;
  uint64_t replies_settled;

  /* idle holder */
  pn_connection_t **conns;
  uint64_t opened, closed;
  bool closing;
} app;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void fail(int status, const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "loadclient %s: ", role_names[app.role]);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(status);
}

static void say(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
  fflush(stdout);
}

static void fail_on_condition(const char *what, pn_condition_t *cond) {
  if (pn_condition_is_set(cond))
    fail(2, "%s: %s: %s", what, pn_condition_get_name(cond),
         pn_condition_get_description(cond) ? pn_condition_get_description(cond) : "");
}

/* The progress shown when a run times out, so a stall can be located. */
static void fail_timeout(void) {
  fail(3, "timed out after %d s: sent=%" PRIu64 " settled=%" PRIu64 " received=%" PRIu64
          " replied=%" PRIu64 " opened=%" PRIu64 " of %" PRIu64,
       app.timeout_s, app.sent, app.settled, app.received, app.replied, app.opened, app.count);
}

static pn_transport_t *new_transport(bool server) {
  pn_transport_t *t = pn_transport();
  if (server) pn_transport_set_server(t);
  pn_sasl_allowed_mechs(pn_sasl(t), "ANONYMOUS");
  return t;
}

static pn_connection_t *new_connection(const char *container) {
  pn_connection_t *c = pn_connection();
  pn_connection_set_container(c, container);
  pn_connection_set_hostname(c, "127.0.0.1");
  return c;
}

static void connect_to(pn_connection_t *c) {
  pn_proactor_connect2(app.proactor, c, new_transport(false), app.connect_addr);
  app.open_transports++;
}

/* Finish: print the result line (already formatted by the caller) and close the connection. */
static void finish(pn_connection_t *c) {
  app.done = true;
  pn_connection_close(c);
}

/* ---- sending ---------------------------------------------------------------------------- */

static pn_delivery_t *send_bytes(pn_link_t *l, uint64_t tag, const char *bytes, size_t size) {
  pn_delivery_t *d = pn_delivery(l, pn_dtag((const char *)&tag, sizeof tag));
  pn_link_send(l, bytes, size);
  pn_link_advance(l);
  return d;
}

static void encode(pn_message_t *m) {
  ssize_t n = pn_message_encode2(m, &app.encoded);
  if (n < 0) fail(2, "cannot encode message: %s", pn_error_text(pn_message_error(m)));
  app.encoded_len = (size_t)n;
}

static void set_body(pn_message_t *m, size_t size) {
  char *body = calloc(1, size ? size : 1);
  pn_message_set_inferred(m, true); /* binary body -> one data section */
  pn_data_put_binary(pn_message_body(m), pn_bytes(size, body));
  free(body);
}

static void sender_pump(void) {
  while (app.sent < app.count && pn_link_credit(app.sender) > 0) {
    if (app.sent == 0) app.start = now();
    pn_delivery_t *d = send_bytes(app.sender, app.sent, app.encoded.start, app.encoded_len);
    app.sent++;
    if (app.presettled) pn_delivery_settle(d);
  }
  if (app.presettled && app.sent == app.count && !app.done) {
    app.end = now();
    say("result count=%" PRIu64 " start=%.6f end=%.6f elapsed=%.6f rate=%.1f", app.sent, app.start,
        app.end, app.end - app.start, (double)app.sent / (app.end - app.start));
    finish(pn_session_connection(pn_link_session(app.sender)));
  }
}

static void sender_outcome(pn_delivery_t *d) {
  uint64_t state = pn_delivery_remote_state(d);
  if (state == 0 && !pn_delivery_settled(d)) return;
  if (state == PN_ACCEPTED) app.accepted++;
  app.settled++;
  pn_delivery_settle(d);
  if (app.settled == app.count) {
    app.end = now();
    say("result count=%" PRIu64 " accepted=%" PRIu64 " start=%.6f end=%.6f elapsed=%.6f rate=%.1f",
        app.settled, app.accepted, app.start, app.end, app.end - app.start,
        (double)app.settled / (app.end - app.start));
    finish(pn_session_connection(pn_link_session(app.sender)));
  }
}

/* ---- receiving -------------------------------------------------------------------------- */

/* Appends the current delivery's bytes to app.rbuf; returns the size once complete, -1 while
 * partial (more PN_DELIVERY events follow), PN_ABORTED if the sender aborted it. */
static ssize_t read_delivery(pn_delivery_t *d) {
  pn_link_t *l = pn_delivery_link(d);
  for (;;) {
    if (app.rbuf_have == app.rbuf_size) {
      app.rbuf_size *= 2;
      app.rbuf = realloc(app.rbuf, app.rbuf_size);
    }
    ssize_t n = pn_link_recv(l, app.rbuf + app.rbuf_have, app.rbuf_size - app.rbuf_have);
    if (n > 0)
      app.rbuf_have += (size_t)n;
    else if (n == PN_EOS)
      return (ssize_t)app.rbuf_have;
    else if (n == 0)
      return -1;
    else if (n == PN_ABORTED)
      return PN_ABORTED;
    else
      fail(2, "cannot read a delivery: error %zd", n);
  }
}

static void top_up_credit(pn_link_t *l) {
  int credit = pn_link_credit(l);
  if (credit < app.credit / 2) pn_link_flow(l, app.credit - credit);
}

/* Settles a complete incoming delivery, accepting it unless the sender settled it already. */
static void consume(pn_delivery_t *d) {
  if (!pn_delivery_settled(d)) pn_delivery_update(d, PN_ACCEPTED);
  pn_delivery_settle(d);
  top_up_credit(pn_delivery_link(d));
}

/* Returns true when d was complete (and advanced past); aborted deliveries are dropped. */
static bool take(pn_delivery_t *d, ssize_t *size) {
  if (!pn_delivery_readable(d)) return false;
  *size = read_delivery(d);
  if (*size == -1) return false;
  app.rbuf_have = 0;
  pn_link_advance(pn_delivery_link(d));
  if (*size == PN_ABORTED) {
    pn_delivery_settle(d);
    return false;
  }
  return true;
}

static void receiver_delivery(pn_delivery_t *d) {
  ssize_t size;
  if (!take(d, &size)) return;
  if (app.received == 0) app.start = now();
  app.received++;
  consume(d);
  if (app.received == app.count) {
    app.end = now();
    say("result count=%" PRIu64 " first=%.6f end=%.6f elapsed=%.6f rate=%.1f", app.received,
        app.start, app.end, app.end - app.start, (double)app.received / (app.end - app.start));
    finish(pn_session_connection(pn_link_session(pn_delivery_link(d))));
  }
}

/* ---- rpc client ------------------------------------------------------------------------- */

static void rpc_client_pump(void) {
  if (!app.reply_to) return;
  while (app.sent < app.count && app.in_flight < (uint64_t)app.outstanding &&
         pn_link_credit(app.sender) > 0) {
    pn_msgid_t id = {.type = PN_ULONG, .u.as_ulong = app.sent};
    pn_message_set_id(app.msg, id);
    pn_message_set_correlation_id(app.msg, id);
    encode(app.msg);
    if (app.sent == 0) app.start = now();
    app.sent_at[app.sent] = now();
    send_bytes(app.sender, app.sent, app.encoded.start, app.encoded_len);
    app.sent++;
    app.in_flight++;
  }
}

static int compare_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double percentile(const double *sorted, uint64_t n, double p) {
  uint64_t i = (uint64_t)(p * (double)(n - 1) + 0.5);
  return sorted[i];
}

static void rpc_client_reply(pn_delivery_t *d) {
  ssize_t size;
  if (!take(d, &size)) return;
  if (pn_message_decode(app.inbox, app.rbuf, (size_t)size) != 0)
    fail(2, "cannot decode a reply: %s", pn_error_text(pn_message_error(app.inbox)));
  pn_msgid_t cid = pn_message_get_correlation_id(app.inbox);
  if (cid.type != PN_ULONG || cid.u.as_ulong >= app.sent)
    fail(2, "reply with an unknown correlation id (type %d)", (int)cid.type);
  app.latencies[app.received++] = now() - app.sent_at[cid.u.as_ulong];
  app.in_flight--;
  consume(d);
  if (app.received == app.count) {
    app.end = now();
    qsort(app.latencies, app.count, sizeof(double), compare_double);
    say("result count=%" PRIu64 " outstanding=%d elapsed=%.6f rate=%.1f p50_us=%.1f p99_us=%.1f",
        app.received, app.outstanding, app.end - app.start,
        (double)app.received / (app.end - app.start), percentile(app.latencies, app.count, 0.50) * 1e6,
        percentile(app.latencies, app.count, 0.99) * 1e6);
    finish(pn_session_connection(pn_link_session(app.sender)));
    return;
  }
  rpc_client_pump();
}

/* ---- rpc server ------------------------------------------------------------------------- */

static void rpc_server_flush(void) {
  while (app.queue_head && pn_link_credit(app.sender) > 0) {
    struct pending *p = app.queue_head;
    send_bytes(app.sender, app.replied++, p->bytes, p->size);
    app.queue_head = p->next;
    if (!app.queue_head) app.queue_tail = NULL;
    free(p);
  }
}

static void rpc_server_request(pn_delivery_t *d) {
  ssize_t size;
  if (!take(d, &size)) return;
  app.received++;
  if (pn_message_decode(app.msg, app.rbuf, (size_t)size) != 0)
    fail(2, "cannot decode a request: %s", pn_error_text(pn_message_error(app.msg)));
  const char *reply_to = pn_message_get_reply_to(app.msg);
  if (!reply_to) fail(2, "request %" PRIu64 " has no reply_to", app.received);
  /* The reply is the request turned around: body echoed, to=reply_to, correlation id kept. */
  char *to = strdup(reply_to);
  pn_msgid_t cid = pn_message_get_correlation_id(app.msg);
  if (cid.type == PN_NULL) cid = pn_message_get_id(app.msg);
  pn_message_set_address(app.msg, to);
  pn_message_set_reply_to(app.msg, NULL);
  pn_message_set_correlation_id(app.msg, cid);
  free(to);
  encode(app.msg);
  struct pending *p = malloc(sizeof *p + app.encoded_len);
  p->next = NULL;
  p->size = app.encoded_len;
  memcpy(p->bytes, app.encoded.start, p->size);
  if (app.queue_tail)
    app.queue_tail->next = p;
  else
    app.queue_head = p;
  app.queue_tail = p;
  consume(d);
  rpc_server_flush();
}

static void rpc_server_outcome(pn_delivery_t *d) {
  uint64_t state = pn_delivery_remote_state(d);
  if (state == 0 && !pn_delivery_settled(d)) return;
  if (state != PN_ACCEPTED)
    fprintf(stderr, "loadclient rpc-server: a reply was not accepted (state %" PRIu64 ")\n", state);
  pn_delivery_settle(d);
  if (++app.replies_settled == app.count) {
    say("result count=%" PRIu64, app.replies_settled);
    finish(pn_session_connection(pn_link_session(app.sender)));
  }
}

/* ---- idle holder ------------------------------------------------------------------------ */

static void *watch_stdin(void *arg) {
  (void)arg;
  char buf[256];
  while (read(STDIN_FILENO, buf, sizeof buf) > 0) {
  }
  pn_proactor_interrupt(app.proactor);
  return NULL;
}

/* ---- listening (direct mode) ------------------------------------------------------------ */

static void answer_link(pn_link_t *l) {
  if (!pn_link_is_receiver(l) || app.receiver)
    fail(2, "direct mode takes one sending link, got a %s link", pn_link_is_receiver(l) ? "second" : "receiving");
  pn_terminus_copy(pn_link_source(l), pn_link_remote_source(l));
  pn_terminus_copy(pn_link_target(l), pn_link_remote_target(l));
  pn_link_set_snd_settle_mode(l, pn_link_remote_snd_settle_mode(l));
  pn_link_open(l);
  app.receiver = l;
  pn_link_flow(l, app.credit);
}

/* ---- event dispatch --------------------------------------------------------------------- */

static void link_attached(pn_link_t *l) {
  if (app.role == RPC_CLIENT && l == app.receiver) {
    const char *addr = pn_terminus_get_address(pn_link_remote_source(l));
    if (!addr || !*addr) fail(2, "the peer assigned no address to the dynamic reply source");
    app.reply_to = strdup(addr);
    pn_message_set_reply_to(app.msg, app.reply_to);
  }
  if (++app.links_ready == ((app.role == SEND || app.role == RECV) ? 1 : 2)) say("ready");
  if (app.role == RPC_CLIENT) rpc_client_pump();
}

static void on_delivery(pn_delivery_t *d) {
  bool incoming = pn_link_is_receiver(pn_delivery_link(d));
  switch (app.role) {
  case SEND:
    sender_outcome(d);
    break;
  case RECV:
    receiver_delivery(d);
    break;
  case RPC_CLIENT:
    if (incoming)
      rpc_client_reply(d);
    else {
      uint64_t state = pn_delivery_remote_state(d);
      if (state == 0 && !pn_delivery_settled(d)) break;
      if (state != PN_ACCEPTED) fail(2, "a request was not accepted (state %" PRIu64 ")", state);
      pn_delivery_settle(d);
      app.settled++;
    }
    break;
  case RPC_SERVER:
    if (incoming)
      rpc_server_request(d);
    else
      rpc_server_outcome(d);
    break;
  case IDLE:
    break;
  }
}

static void on_flow(pn_link_t *l) {
  if (l != app.sender) return;
  if (app.role == SEND) sender_pump();
  if (app.role == RPC_CLIENT) rpc_client_pump();
  if (app.role == RPC_SERVER) rpc_server_flush();
}

static void handle(pn_event_t *e) {
  switch (pn_event_type(e)) {
  case PN_LISTENER_OPEN: {
    char host[256], port[32];
    pn_netaddr_host_port(pn_listener_addr(pn_event_listener(e)), host, sizeof host, port, sizeof port);
    say("listening on %s:%s", host, port);
    break;
  }
  case PN_LISTENER_ACCEPT:
    pn_listener_accept2(pn_event_listener(e), NULL, new_transport(true));
    app.open_transports++;
    pn_listener_close(pn_event_listener(e)); /* direct mode serves one sender */
    break;
  case PN_LISTENER_CLOSE:
    fail_on_condition("listener", pn_listener_condition(pn_event_listener(e)));
    break;
  case PN_CONNECTION_REMOTE_OPEN: {
    pn_connection_t *c = pn_event_connection(e);
    if (pn_connection_state(c) & PN_LOCAL_UNINIT) pn_connection_open(c);
    if (app.role == IDLE && ++app.opened == app.count) {
      pn_proactor_cancel_timeout(app.proactor);
      say("ready opened=%" PRIu64, app.opened);
    }
    break;
  }
  case PN_SESSION_REMOTE_OPEN: {
    pn_session_t *s = pn_event_session(e);
    if (pn_session_state(s) & PN_LOCAL_UNINIT) pn_session_open(s);
    break;
  }
  case PN_LINK_REMOTE_OPEN: {
    pn_link_t *l = pn_event_link(e);
    if (pn_link_state(l) & PN_LOCAL_UNINIT)
      answer_link(l);
    else
      link_attached(l);
    break;
  }
  case PN_LINK_FLOW:
    on_flow(pn_event_link(e));
    break;
  case PN_DELIVERY:
    on_delivery(pn_event_delivery(e));
    break;
  case PN_LINK_REMOTE_CLOSE:
  case PN_LINK_REMOTE_DETACH:
    fail_on_condition("link closed by the peer", pn_link_remote_condition(pn_event_link(e)));
    if (!app.done) fail(2, "link %s closed by the peer before the run finished", pn_link_name(pn_event_link(e)));
    break;
  case PN_CONNECTION_REMOTE_CLOSE: {
    pn_connection_t *c = pn_event_connection(e);
    fail_on_condition("connection closed by the peer", pn_connection_remote_condition(c));
    if (!app.done && !app.closing)
      fail(2, "connection closed by the peer before the run finished");
    pn_connection_close(c);
    break;
  }
  case PN_CONNECTION_WAKE: /* idle holder: stdin closed, close this connection */
    pn_connection_close(pn_event_connection(e));
    break;
  case PN_TRANSPORT_CLOSED:
    if (!app.done && !app.closing)
      fail_on_condition("transport", pn_transport_condition(pn_event_transport(e)));
    if (app.role == IDLE && !app.closing) fail(2, "a held connection was closed by the peer");
    app.open_transports--;
    if ((app.done || app.closing) && app.open_transports == 0) exit(0);
    if (!app.done && !app.closing) fail(2, "connection ended before the run finished");
    break;
  case PN_PROACTOR_INTERRUPT:
    app.closing = true;
    for (uint64_t i = 0; i < app.count; i++) pn_connection_wake(app.conns[i]);
    pn_proactor_set_timeout(app.proactor, 10000);
    break;
  case PN_PROACTOR_TIMEOUT:
    if (app.closing) fail(3, "connections did not close within 10 s");
    fail_timeout();
    break;
  default:
    break;
  }
}

/* ---- set-up ----------------------------------------------------------------------------- */

static pn_session_t *open_session(void) {
  pn_connection_t *c = new_connection(role_names[app.role]);
  pn_connection_open(c);
  pn_session_t *s = pn_session(c);
  pn_session_open(s);
  return s;
}

static pn_link_t *open_sender(pn_session_t *s, const char *name, const char *target) {
  pn_link_t *l = pn_sender(s, name);
  if (target) pn_terminus_set_address(pn_link_target(l), target);
  pn_link_set_snd_settle_mode(l, app.presettled ? PN_SND_SETTLED : PN_SND_UNSETTLED);
  pn_link_open(l);
  return l;
}

static pn_link_t *open_receiver(pn_session_t *s, const char *name, const char *source) {
  pn_link_t *l = pn_receiver(s, name);
  if (source)
    pn_terminus_set_address(pn_link_source(l), source);
  else
    pn_terminus_set_dynamic(pn_link_source(l), true);
  pn_link_open(l);
  pn_link_flow(l, app.credit);
  return l;
}

static void start(void) {
  app.msg = pn_message();
  app.inbox = pn_message();
  app.rbuf_size = 4096;
  app.rbuf = malloc(app.rbuf_size);
  if (app.role == RECV && app.listen_addr) {
    app.listener = pn_listener();
    pn_proactor_listen(app.proactor, app.listener, app.listen_addr, 16);
    return;
  }
  if (app.role == IDLE) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    app.conns = calloc(app.count, sizeof *app.conns);
    for (uint64_t i = 0; i < app.count; i++) {
      char name[32];
      snprintf(name, sizeof name, "idle-%" PRIu64, i);
      app.conns[i] = new_connection(name);
      pn_connection_open(app.conns[i]);
      connect_to(app.conns[i]);
    }
    pthread_t watcher;
    pthread_create(&watcher, NULL, watch_stdin, NULL);
    return;
  }
  pn_session_t *s = open_session();
  switch (app.role) {
  case SEND:
    set_body(app.msg, app.size);
    encode(app.msg);
    app.sender = open_sender(s, "bench-send", app.address);
    break;
  case RECV:
    app.receiver = open_receiver(s, "bench-recv", app.address);
    break;
  case RPC_CLIENT:
    app.sent_at = calloc(app.count, sizeof(double));
    app.latencies = calloc(app.count, sizeof(double));
    set_body(app.msg, app.size);
    if (app.credit < app.outstanding) app.credit = app.outstanding;
    app.receiver = open_receiver(s, "rpc-replies", NULL);
    app.sender = open_sender(s, "rpc-requests", app.address);
    break;
  case RPC_SERVER:
    app.receiver = open_receiver(s, "rpc-service", app.address);
    app.sender = open_sender(s, "rpc-answers", NULL); /* null target: anonymous relay */
    break;
  case IDLE:
    break;
  }
  connect_to(pn_session_connection(s));
}

static void usage(void) {
  fprintf(stderr,
          "usage: loadclient send|recv|rpc-client|rpc-server|idle [-a HOST:PORT | -l HOST:PORT]\n"
          "         [-t ADDRESS] [-n COUNT] [-s BODY_BYTES] [-c CREDIT] [-o OUTSTANDING] [-p] [-T SECONDS]\n"
          "  -a connect to HOST:PORT; -l listen on HOST:PORT (recv only, direct mode)\n"
          "  -n messages, requests or connections; -p pre-settled; -T time-out for the whole run\n");
  exit(1);
}

int main(int argc, char **argv) {
  if (argc < 2) usage();
  bool known = false;
  for (int r = SEND; r <= IDLE; r++)
    if (strcmp(argv[1], role_names[r]) == 0) {
      app.role = (enum role)r;
      known = true;
    }
  if (!known) usage();
  app.count = 1000;
  app.size = 100;
  app.credit = 1000;
  app.outstanding = 1;
  app.timeout_s = 60;
  app.address = "bench";
  int opt;
  optind = 2;
  while ((opt = getopt(argc, argv, "a:l:t:n:s:c:o:pT:")) != -1) {
    switch (opt) {
    case 'a': app.connect_addr = optarg; break;
    case 'l': app.listen_addr = optarg; break;
    case 't': app.address = optarg; break;
    case 'n': app.count = strtoull(optarg, NULL, 10); break;
    case 's': app.size = strtoull(optarg, NULL, 10); break;
    case 'c': app.credit = atoi(optarg); break;
    case 'o': app.outstanding = atoi(optarg); break;
    case 'p': app.presettled = true; break;
    case 'T': app.timeout_s = atoi(optarg); break;
    default: usage();
    }
  }
  if (optind != argc || app.count == 0 || app.credit < 1 || app.outstanding < 1 || app.timeout_s < 1) usage();
  if (!app.connect_addr == !app.listen_addr) usage();
  if (app.listen_addr && app.role != RECV) usage();

  app.proactor = pn_proactor();
  pn_proactor_set_timeout(app.proactor, (pn_millis_t)app.timeout_s * 1000);
  start();
  for (;;) {
    pn_event_batch_t *batch = pn_proactor_wait(app.proactor);
    pn_event_t *e;
    while ((e = pn_event_batch_next(batch))) handle(e);
    pn_proactor_done(app.proactor, batch);
  }
}
