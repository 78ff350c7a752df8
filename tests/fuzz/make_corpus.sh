#!/bin/sh
# Writes the seed corpus for the HTTP request fuzzer (tests/fuzz/fuzz_http.c).
# Run from the repository root: sh tests/fuzz/make_corpus.sh
#
# Names carry the expected outcome, which tests/unit/test_http_parse.c checks:
#   ok-*   every byte of the file is a sequence of valid requests (heads and
#          their Content-Length or chunked bodies);
#   bad-*  the first request is rejected, by the head parser or by the chunked
#          decoder (the request smuggling cases and other malformed framing).
set -eu
dir=tests/fuzz/corpus/http_request
mkdir -p "$dir"
rm -f "$dir"/ok-* "$dir"/bad-*

w() { # w NAME FORMAT: printf FORMAT into the corpus file NAME
    printf "$2" >"$dir/$1"
}

H='Host: gw\r\n'

# Valid requests.
w ok-get.http               "GET / HTTP/1.1\r\n${H}\r\n"
w ok-post-cl.http           "POST /v1/chat/completions HTTP/1.1\r\n${H}Content-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"model\":\"m\"}"
w ok-post-chunked.http      "POST /v1/completions HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
w ok-chunked-ext.http       "POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n2 ; q=\"x\\\\\"y\" ;z\r\nde\r\n0;last\r\n\r\n"
w ok-chunked-trailer.http   "POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\nX-Checksum: abc\r\nX-Empty:\r\n\r\n"
w ok-chunked-pipelined.http "POST / HTTP/1.1\r\n${H}Transfer-Encoding: Chunked\r\n\r\n1\r\nx\r\n0\r\n\r\nGET /next HTTP/1.1\r\n${H}\r\n"
w ok-pipelined.http         "GET /a HTTP/1.1\r\n${H}\r\nPOST /b HTTP/1.1\r\n${H}Content-Length: 2\r\n\r\nhiGET /c HTTP/1.1\r\n${H}Connection: close\r\n\r\n"
w ok-http10.http            "GET /old HTTP/1.0\r\n\r\n"
w ok-http10-keepalive.http  "GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
w ok-connection-list.http   "GET / HTTP/1.1\r\n${H}Connection: keep-alive, Upgrade ,, close\r\nUpgrade: x\r\n\r\n"
w ok-expect.http            "POST / HTTP/1.1\r\n${H}Expect: 100-continue\r\nContent-Length: 1\r\n\r\nx"
w ok-ows-case.http          "GET /?q=1 HTTP/1.1\r\nhOsT:gw\r\nX-Pad: \t  spaced value \t\r\nX-None:\r\ncontent-LENGTH: 0\r\n\r\n"
w ok-options-star.http      "OPTIONS * HTTP/1.1\r\n${H}\r\n"

# Content-Length smuggling and malformed values.
w bad-cl-te.http            "POST / HTTP/1.1\r\n${H}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
w bad-te-cl.http            "POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
w bad-cl-twice-equal.http   "POST / HTTP/1.1\r\n${H}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
w bad-cl-twice-diff.http    "POST / HTTP/1.1\r\n${H}Content-Length: 5\r\nContent-Length: 0\r\n\r\nhello"
w bad-cl-plus.http          "POST / HTTP/1.1\r\n${H}Content-Length: +5\r\n\r\nhello"
w bad-cl-hex.http           "POST / HTTP/1.1\r\n${H}Content-Length: 0x5\r\n\r\nhello"
w bad-cl-list.http          "POST / HTTP/1.1\r\n${H}Content-Length: 5,5\r\n\r\nhello"
w bad-cl-empty.http         "POST / HTTP/1.1\r\n${H}Content-Length: \r\n\r\n"
w bad-cl-negative.http      "POST / HTTP/1.1\r\n${H}Content-Length: -1\r\n\r\n"
w bad-cl-overflow.http      "POST / HTTP/1.1\r\n${H}Content-Length: 9223372036854775808\r\n\r\n"
w bad-cl-space-colon.http   "POST / HTTP/1.1\r\n${H}Content-Length : 5\r\n\r\nhello"
w bad-cl-tab-colon.http     "POST / HTTP/1.1\r\n${H}Content-Length\t: 5\r\n\r\nhello"

# Transfer-Encoding other than one lone "chunked".
w bad-te-double.http        "POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"
w bad-te-gzip.http          "POST / HTTP/1.1\r\n${H}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
w bad-te-identity.http      "POST / HTTP/1.1\r\n${H}Transfer-Encoding: identity\r\n\r\n"
w bad-te-xchunked.http      "POST / HTTP/1.1\r\n${H}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
w bad-te-two-fields.http    "POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
w bad-te-trailing.http      "POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked x\r\n\r\n0\r\n\r\n"
w bad-te-http10.http        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"

# Line and field syntax.
w bad-nul-value.http        "GET / HTTP/1.1\r\n${H}X-A: a\000b\r\n\r\n"
w bad-bare-cr.http          "GET / HTTP/1.1\r\n${H}X-A: a\rb\r\n\r\n"
w bad-bare-lf.http          "GET / HTTP/1.1\n${H}\n"
w bad-obs-fold.http         "GET / HTTP/1.1\r\n${H}X-A: a\r\n b\r\n\r\n"
w bad-name-char.http        "GET / HTTP/1.1\r\n${H}X(A): b\r\n\r\n"
w bad-double-space.http     "GET  / HTTP/1.1\r\n${H}\r\n"
w bad-lowercase-version.http "GET / http/1.1\r\n${H}\r\n"
w bad-http2.http            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
w bad-no-host.http          "GET / HTTP/1.1\r\n\r\n"
w bad-two-hosts.http        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"

# Chunked bodies behind a valid head.
w bad-chunk-size-0x.http    "POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"
w bad-chunk-no-crlf.http    "POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"
w bad-chunk-bare-lf.http    "POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"
w bad-chunk-digits.http     "POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\n0000000000000005\r\nhello\r\n0\r\n\r\n"
w bad-chunk-trailer.http    "POST / HTTP/1.1\r\n${H}Transfer-Encoding: chunked\r\n\r\n0\r\nX-T : v\r\n\r\n"
