// A raw-TCP fake upstream, run inside the test's own process: it parses the
// requests the gateway sends (request line, headers, Content-Length body)
// and lets the test answer with any bytes at all (malformed framing, a
// non-HTTP answer, a socket closed at any point), which tests/fakes/upstream.mjs
// (node:http) cannot. Every connection and every request is recorded, so a
// test can tell whether the gateway reused an upstream connection or opened
// a new one, and whether the gateway (not the fake) closed a connection.
//
//   const up = await startRawUpstream((sock, req, conn) => { sock.write(...) });
//
// The answer function gets the socket, the request {conn, seq, method,
// target, version, head, headerLines, headers (lowercase names, last value
// wins), body (Buffer), t (arrival, ms)} and the connection record {id, seq
// (requests seen), closed, peerEnded (the gateway closed or reset it), tls,
// firstBytes, flushed}. A request's seq is its index on its connection:
// seq > 0 means the gateway reused the connection. writeAll (below) answers
// with back-pressure and counts what it flushed.
//
// A connection whose first byte is 0x16 (a TLS ClientHello) is recorded with
// tls: true and closed at once: the scheme dispatch test needs no TLS server.
import net from 'node:net';

const MAX_PENDING = 64 * 1024 * 1024;   // request bytes kept per connection
const MAX_HEAD = 1024 * 1024;

export async function startRawUpstream(answer, opts = {}) {
    const conns = [];
    const requests = [];
    const waiters = new Set();
    const poke = () => { for (const w of [...waiters]) w(); };

    const server = net.createServer({ noDelay: true }, (sock) => {
        const conn = { id: conns.length, sock, seq: 0, closed: false, peerEnded: false, tls: false,
            firstBytes: null, openedAt: Date.now(), closedAt: 0, error: null, flushed: 0 };
        conns.push(conn);
        let buf = Buffer.alloc(0);
        sock.on('error', (e) => {
            conn.error = e.code || e.message;
            if (e.code === 'ECONNRESET' || e.code === 'EPIPE') conn.peerEnded = true;
            poke();
        });
        // The gateway closed (FIN): allowHalfOpen is off, so Node ends our
        // side too.
        sock.on('end', () => { conn.peerEnded = true; poke(); });
        sock.on('close', () => { conn.closed = true; conn.closedAt = Date.now(); poke(); });
        sock.on('data', (d) => {
            if (!conn.firstBytes) {
                conn.firstBytes = d.subarray(0, 16);
                if (d[0] === 0x16) {
                    conn.tls = true;
                    sock.destroy();
                    poke();
                    return;
                }
            }
            buf = buf.length ? Buffer.concat([buf, d]) : d;
            if (buf.length > MAX_PENDING) {
                conn.error = 'request too large for the raw fake';
                sock.destroy();
                return;
            }
            for (;;) {
                const he = buf.indexOf('\r\n\r\n');
                if (he < 0) {
                    if (buf.length > MAX_HEAD) { conn.error = 'request head too large'; sock.destroy(); }
                    return;
                }
                const head = buf.subarray(0, he).toString('latin1');
                const lines = head.split('\r\n');
                const [method, target, version] = lines[0].split(' ');
                const headerLines = lines.slice(1);
                const headers = {};
                for (const l of headerLines) {
                    const c = l.indexOf(':');
                    headers[l.slice(0, c).toLowerCase()] = l.slice(c + 1).trim();
                }
                if (headers['transfer-encoding'] !== undefined) {
                    conn.error = 'chunked request bodies are not parsed by the raw fake';
                    sock.destroy();
                    return;
                }
                const cl = headers['content-length'] === undefined ? 0 : Number(headers['content-length']);
                if (buf.length < he + 4 + cl) return;
                const body = Buffer.from(buf.subarray(he + 4, he + 4 + cl));
                buf = buf.subarray(he + 4 + cl);
                const req = { conn: conn.id, seq: conn.seq++, method, target, version, head, headerLines,
                    headers, body, t: Date.now() };
                requests.push(req);
                poke();
                answer(sock, req, conn);
            }
        });
    });
    await new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(opts.port || 0, '127.0.0.1', resolve);
    });
    const { port } = server.address();
    return {
        port,
        url: `http://127.0.0.1:${port}`,
        conns,
        requests,
        // Every request that carried header name (lowercase) with value v, in
        // arrival order (a resend shows as a second entry).
        requestsWith(name, v) { return requests.filter((r) => r.headers[name] === v); },
        open() { return conns.filter((c) => !c.closed).length; },
        // Resolves once pred() is true; rejects after timeoutMs naming what.
        until(pred, what, timeoutMs = 5000) {
            return new Promise((resolve, reject) => {
                const check = () => {
                    let v;
                    try { v = pred(); } catch { v = false; }
                    if (!v) return false;
                    waiters.delete(check);
                    clearTimeout(timer);
                    resolve(v);
                    return true;
                };
                const timer = setTimeout(() => {
                    waiters.delete(check);
                    const state = conns.map((c) => `${c.id}:${c.seq}${c.closed ? 'c' : ''}${c.peerEnded ? 'p' : ''}`).join(' ');
                    reject(new Error(`raw upstream ${port}: ${what} not true within ${timeoutMs} ms ` +
                        `(connections id:requests, c closed, p closed by the peer: ${state})`));
                }, timeoutMs);
                waiters.add(check);
                check();
            });
        },
        close() {
            for (const c of conns) c.sock.destroy();
            return new Promise((resolve) => server.close(() => resolve()));
        },
    };
}

// Writes pieces (strings or Buffers) one after the other, waiting for
// 'drain' when the socket's buffer is full, so that a reader that stops
// reading stops the writer. req.flushed (and conn.flushed, over the
// connection's life) count the bytes handed to the kernel; req.doneAt is
// when the last of them was. Stops quietly
// when the socket goes away.
export function writeAll(sock, req, conn, pieces) {
    let i = 0;
    req.flushed = 0;
    const step = () => {
        while (i < pieces.length) {
            if (sock.destroyed) return;
            const p = pieces[i++];
            const n = Buffer.byteLength(p);
            const last = i === pieces.length;
            const ok = sock.write(p, (err) => {
                if (err) return;
                req.flushed += n;
                conn.flushed += n;
                if (last) req.doneAt = Date.now();
            });
            if (!ok) {
                sock.once('drain', step);
                return;
            }
        }
    };
    step();
}
