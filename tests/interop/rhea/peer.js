// A rhea client for meshbus's interop tests (tests/rhea.py starts it): node peer.js MODE URL ARGS_JSON.
// It prints one JSON object per line. Modes:
//   send     ARGS {address, messages, anonymous}: send `messages` (each {body, subject, message_id,
//            application_properties, to}; a body {"binary": base64} is sent as binary) on a sender to
//            `address`, or on the connection's anonymous sender (each message's `to`) when `anonymous`;
//            print each one's outcome {n, outcome, condition, undeliverable_here, ms}; exit once all settled.
//   receive  ARGS {address, count, outcome, credit}: print {ready} once attached, then {message} for each
//            message, settled with `outcome` (accept, reject or release); exit after `count`.
//   serve    ARGS {address}: print {ready}; answer each request on its reply-to, with its message-id as
//            correlation-id and {"echo": body} as body, then accept it; run until stdin closes.
//   call     ARGS {address, requests}: on a dynamic reply address, send each request body, message-ids
//            0, 1...; print {reply, correlation_id} for each reply; exit once all came.
'use strict';

const rhea = require('rhea');

const [mode, url, argsJson] = process.argv.slice(2);
const args = JSON.parse(argsJson || '{}');
const { hostname, port } = new URL(url);

function print(object) {
    process.stdout.write(JSON.stringify(object) + '\n');
}

// AMQP values as JSON: binary as {"binary": base64}, the rest as rhea decodes them.
function toJson(value) {
    if (Buffer.isBuffer(value)) return { binary: value.toString('base64') };
    if (Array.isArray(value)) return value.map(toJson);
    if (value !== null && typeof value === 'object') {
        return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toJson(v)]));
    }
    return value;
}

function fromJson(value) {
    if (value !== null && typeof value === 'object' && !Array.isArray(value) && 'binary' in value) {
        return Buffer.from(value.binary, 'base64');
    }
    return value;
}

function outgoing(spec) {
    const message = { body: fromJson(spec.body) };
    for (const field of ['subject', 'message_id', 'application_properties', 'to']) {
        if (spec[field] !== undefined) message[field] = spec[field];
    }
    return message;
}

function incoming(message) {
    const fields = { body: toJson(message.body) };
    for (const field of ['subject', 'message_id', 'correlation_id', 'application_properties']) {
        if (message[field] !== undefined) fields[field] = toJson(message[field]);
    }
    return fields;
}

const container = rhea.create_container({ id: `rhea-${mode}-${process.pid}` });
const connection = container.connect({ host: hostname, port: Number(port), reconnect: false });

let closing = false;
connection.on('disconnected', (context) => {
    if (closing) return;
    print({ error: `disconnected: ${context.error || 'the router closed the connection'}` });
    process.exit(2);
});

function finish() {
    closing = true;
    connection.once('connection_close', () => process.exit(0));
    connection.close();
}

function send() {
    const numbers = new Map(); // delivery -> its message's index
    const sentAt = [];
    let settled = 0;
    const sender = args.anonymous ? connection.open_sender({ target: {} }) : connection.open_sender(args.address);
    function report(context, outcome) {
        const n = numbers.get(context.delivery);
        const state = context.delivery.remote_state || {};
        print({
            n,
            outcome,
            condition: state.error ? state.error.condition : null,
            undeliverable_here: Boolean(state.undeliverable_here),
            ms: Number(process.hrtime.bigint() - sentAt[n]) / 1e6,
        });
        settled += 1;
        if (settled === args.messages.length) finish();
    }
    sender.on('sendable', () => {
        while (sentAt.length < args.messages.length && sender.sendable()) {
            const n = sentAt.length;
            sentAt.push(process.hrtime.bigint());
            numbers.set(sender.send(outgoing(args.messages[n])), n);
        }
    });
    for (const outcome of ['accepted', 'rejected', 'released', 'modified']) {
        sender.on(outcome, (context) => report(context, outcome));
    }
}

function receive() {
    let received = 0;
    const receiver = connection.open_receiver({
        source: { address: args.address },
        autoaccept: false,
        credit_window: args.credit || 10,
    });
    receiver.on('receiver_open', () => print({ ready: true }));
    receiver.on('message', (context) => {
        print({ message: incoming(context.message) });
        if (args.outcome === 'reject') {
            context.delivery.reject({ condition: 'rhea-peer:refused', description: 'refused by the test' });
        } else if (args.outcome === 'release') {
            context.delivery.release();
        } else {
            context.delivery.accept();
        }
        received += 1;
        if (received === args.count) finish();
    });
}

function serve() {
    const receiver = connection.open_receiver({ source: { address: args.address }, autoaccept: false });
    receiver.on('receiver_open', () => print({ ready: true }));
    receiver.on('message', (context) => {
        const request = context.message;
        connection.send({ to: request.reply_to, correlation_id: request.message_id, body: { echo: request.body } });
        context.delivery.accept();
        print({ served: toJson(request.body) });
    });
    process.stdin.on('end', finish);
    process.stdin.resume();
}

function call() {
    let replies = 0;
    const sender = connection.open_sender(args.address);
    const receiver = connection.open_receiver({ source: { dynamic: true } });
    receiver.on('receiver_open', (context) => {
        const replyTo = context.receiver.source.address;
        let next = 0;
        const pump = () => {
            while (next < args.requests.length && sender.sendable()) {
                sender.send({ message_id: next, reply_to: replyTo, body: args.requests[next] });
                next += 1;
            }
        };
        sender.on('sendable', pump);
        pump();
    });
    receiver.on('message', (context) => {
        print({ reply: toJson(context.message.body), correlation_id: context.message.correlation_id });
        replies += 1;
        if (replies === args.requests.length) finish();
    });
}

({ send, receive, serve, call })[mode]();
