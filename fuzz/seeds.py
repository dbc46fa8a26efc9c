#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets that take binary or
hand-assembled inputs: fuzz/corpus/{hbone_frames,hbone_request,cni_plugin,
cni_agent_request,cni_conflist}/. The config seeds (corpus/config/) are
plain YAML files kept as they are.

The HTTP/2 frames are built here byte by byte (RFC 9113 framing, RFC 7541
HPACK literals without Huffman), so that they do not come from the h2 crate
the server itself uses. Run from anywhere: python3 fuzz/seeds.py
"""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- HTTP/2 ---------------------------------------------------------------

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 0x1, 0x1, 0x4, 0x8, 0x20


def frame(ty, flags, stream, payload=b""):
    n = len(payload)
    return bytes([n >> 16 & 0xFF, n >> 8 & 0xFF, n & 0xFF, ty, flags]) + struct.pack(">I", stream) + payload


def hint(value, prefix_bits, first=0):
    """HPACK integer with an N-bit prefix; `first` holds the pattern bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def hstr(s):
    if isinstance(s, str):
        s = s.encode()
    return hint(len(s), 7) + s


# Static table (RFC 7541 Appendix A) names used below.
STATIC = {":authority": 1, ":method": 2, ":path": 4, ":scheme": 6, "user-agent": 58}


def literal(name, value, index=False):
    """Literal header field; with `index`, added to the dynamic table."""
    pattern, bits = (0x40, 6) if index else (0x00, 4)
    if name in STATIC:
        return hint(STATIC[name], bits, pattern) + hstr(value)
    return bytes([pattern]) + hstr(name) + hstr(value)


def block(*fields):
    return b"".join(literal(n, v) for n, v in fields)


def settings(*pairs, ack=False):
    return frame(SETTINGS, ACK if ack else 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


# What the Sluice client sends first: push off, 4 MiB stream and 16 MiB
# connection windows, 1 MiB frames, a 16 KiB header list.
CLIENT_START = settings((2, 0), (4, 4 << 20), (5, 1 << 20), (6, 16 << 10)) + frame(
    WINDOW_UPDATE, 0, 0, struct.pack(">I", (16 << 20) - 65535)
)
SETTINGS_ACK = settings(ack=True)


def connect(stream, authority, extra=(), end_stream=False):
    fields = [(":method", "CONNECT"), (":authority", authority)] + list(extra)
    return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream, block(*fields))


def data(stream, payload, end=True):
    return frame(DATA, END_STREAM if end else 0, stream, payload)


def hbone_frames():
    t = "hbone_frames"
    ok = CLIENT_START + SETTINGS_ACK + connect(1, "10.0.0.2:8080") + data(1, b"hello through the tunnel\n")
    write(t, "connect-ok", b"\x00" + ok)
    write(t, "connect-ok-draining", b"\x01" + ok)
    write(t, "connect-ok-drain-after", b"\x04" + ok)
    write(t, "connect-v6", b"\x02" + CLIENT_START + connect(1, "[fd00::2]:8080") + data(1, b"v6"))
    write(t, "connect-v4-mapped", b"\x00" + CLIENT_START + connect(1, "[::ffff:10.0.0.2]:8080") + data(1, b"x"))
    write(t, "connect-denied", b"\x00" + CLIENT_START + connect(1, "10.0.0.2:8081", end_stream=True))
    write(t, "connect-unavailable", b"\x00" + CLIENT_START + connect(1, "10.0.0.2:8082", end_stream=True))
    write(t, "connect-other-pod", b"\x00" + CLIENT_START + connect(1, "10.0.0.9:8080", end_stream=True))
    write(t, "connect-own-port", b"\x00" + CLIENT_START + connect(1, "10.0.0.2:15008", end_stream=True))
    write(t, "connect-no-port", b"\x00" + CLIENT_START + connect(1, "10.0.0.2", end_stream=True))
    write(t, "connect-hostname", b"\x00" + CLIENT_START + connect(1, "httpbin.default.svc:80", end_stream=True))
    write(t, "connect-port-too-big", b"\x00" + CLIENT_START + connect(1, "10.0.0.2:99999", end_stream=True))
    write(
        t,
        "connect-no-authority",
        b"\x00" + CLIENT_START + frame(HEADERS, END_HEADERS | END_STREAM, 1, block((":method", "CONNECT"))),
    )
    get = block((":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "10.0.0.2:8080"))
    write(t, "get", b"\x00" + CLIENT_START + frame(HEADERS, END_HEADERS | END_STREAM, 1, get))
    post = block((":method", "POST"), (":scheme", "https"), (":path", "/upload"), (":authority", "10.0.0.2:8080"))
    write(t, "post-body", b"\x00" + CLIENT_START + frame(HEADERS, END_HEADERS, 1, post) + data(1, b"a=1&b=2"))
    ztunnel = [
        ("baggage", "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("forwarded", "for=10.0.0.1"),
    ]
    write(t, "connect-ztunnel-headers", b"\x00" + CLIENT_START + connect(1, "10.0.0.2:8080", ztunnel) + data(1, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    streams = CLIENT_START + connect(1, "10.0.0.2:8080") + connect(3, "10.0.0.2:8081") + connect(5, "10.0.0.2:80")
    streams += data(1, b"one", end=False) + data(5, b"five") + data(1, b"", end=True)
    write(t, "three-streams", b"\x00" + streams)
    # A header block split over HEADERS + CONTINUATION.
    hb = block((":method", "CONNECT"), (":authority", "10.0.0.2:8080"), ("x-long", "y" * 40))
    write(
        t,
        "continuation",
        b"\x00" + CLIENT_START + frame(HEADERS, 0, 1, hb[:10]) + frame(CONTINUATION, END_HEADERS, 1, hb[10:]) + data(1, b"c"),
    )
    # PADDED + PRIORITY flags on HEADERS.
    padded = bytes([4]) + struct.pack(">I", 0) + bytes([15]) + block((":method", "CONNECT"), (":authority", "10.0.0.2:8080")) + b"\0" * 4
    write(t, "headers-padded-priority", b"\x00" + CLIENT_START + frame(HEADERS, END_HEADERS | PADDED | PRIO, 1, padded) + data(1, b"p"))
    write(
        t,
        "reset-after-connect",
        b"\x00" + CLIENT_START + connect(1, "10.0.0.2:8080") + data(1, b"partial", end=False) + frame(RST_STREAM, 0, 1, struct.pack(">I", 8)),
    )
    control = frame(PING, 0, 0, b"12345678") + frame(PRIORITY, 0, 3, struct.pack(">IB", 1, 200))
    control += frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1000)) + frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0) + b"bye")
    write(t, "ping-priority-goaway", b"\x00" + CLIENT_START + connect(1, "10.0.0.2:8080") + control)
    many = [("x-h%03d" % i, "v" * 64) for i in range(200)]
    write(t, "many-headers", b"\x00" + CLIENT_START + connect(1, "10.0.0.2:8080", many, end_stream=True))
    # Dynamic table: the first request indexes :authority, the second refers to it (index 62).
    first = literal(":method", "CONNECT") + literal(":authority", "10.0.0.2:8080", index=True)
    second = literal(":method", "CONNECT") + bytes([0x80 | 62])
    write(
        t,
        "dynamic-table",
        b"\x00" + CLIENT_START + frame(HEADERS, END_HEADERS, 1, first) + frame(HEADERS, END_HEADERS, 3, second) + data(1, b"1") + data(3, b"3"),
    )
    write(t, "table-size-update", b"\x00" + CLIENT_START + frame(HEADERS, END_HEADERS | END_STREAM, 1, bytes([0x20]) + first))
    write(t, "extended-connect", b"\x00" + CLIENT_START + frame(HEADERS, END_HEADERS | END_STREAM, 1, block((":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"), (":path", "/"), (":authority", "10.0.0.2:8080"))))
    trailers = frame(HEADERS, END_HEADERS | END_STREAM, 1, block(("grpc-status", "0")))
    write(t, "trailers", b"\x00" + CLIENT_START + connect(1, "10.0.0.2:8080") + data(1, b"t", end=False) + trailers)
    write(t, "bad-header-names", b"\x00" + CLIENT_START + connect(1, "10.0.0.2:8080", [("Upper", "x"), ("connection", "close"), ("te", "gzip")]))
    write(t, "push-promise-from-client", b"\x00" + CLIENT_START + frame(PUSH_PROMISE, END_HEADERS, 1, struct.pack(">I", 2) + block((":method", "GET"))))
    write(t, "preface-only", b"\x00")
    write(t, "settings-only", b"\x00" + CLIENT_START)


# ---- hbone_request (text) -------------------------------------------------


def hbone_request():
    t = "hbone_request"
    write(t, "connect-ok", "0\nCONNECT 10.0.0.2:8080\n\nhello through the tunnel\n")
    write(t, "connect-ok-v6", "1\nCONNECT [fd00::2]:8080\n\nv6 body")
    write(t, "connect-v4-mapped", "0\nCONNECT [::ffff:10.0.0.2]:8080\n\nmapped")
    write(t, "connect-denied", "0\nCONNECT 10.0.0.2:8081\n")
    write(t, "connect-unavailable", "0\nCONNECT 10.0.0.2:8082\n")
    write(t, "connect-other-pod", "0\nCONNECT 10.0.0.9:8080\n")
    write(t, "connect-v6-on-v4", "0\nCONNECT [fd00::2]:8080\n")
    write(t, "connect-hostname", "0\nCONNECT httpbin.default.svc.cluster.local:80\n")
    write(t, "connect-userinfo", "0\nCONNECT user@10.0.0.2:8080\n")
    write(t, "get", "0\nGET http://10.0.0.2:8080/\naccept: */*\n")
    write(t, "post", "0\nPOST https://10.0.0.2:8080/upload\ncontent-type: text/plain\n\nbody")
    write(
        t,
        "connect-ztunnel-headers",
        "0\nCONNECT 10.0.0.2:8080\nbaggage: k8s.namespace.name=default,k8s.deployment.name=sleep\n"
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nforwarded: for=10.0.0.1\n\n"
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    write(
        t,
        "mixed",
        "0\nCONNECT 10.0.0.2:8080\n\none\n%%\nCONNECT 10.0.0.2:8081\n%%\nGET http://10.0.0.2/\n%%\nCONNECT 10.0.0.2:80\n\nfour",
    )
    write(t, "big-header", "0\nCONNECT 10.0.0.2:8080\nx-big: " + "a" * 20000 + "\n\nz")
    write(t, "binary-body", b"0\nCONNECT 10.0.0.2:8080\n\n" + bytes(range(256)) * 8)


# ---- CNI ------------------------------------------------------------------

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
FUZZ_LOG = "/tmp/sluice-fuzz/cni.log"
PREV_1 = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0", "mac": "7a:2f:6c:03:9e:11"}, {"name": "eth0", "sandbox": "/proc/self/ns/net"}],
    "ips": [{"address": "10.10.1.130/25", "gateway": "10.10.1.129", "interface": 1}, {"address": "fd10:1::82/64", "interface": 1}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
PREV_04 = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "sandbox": "/proc/self/ns/net"}],
    "ips": [{"version": "4", "address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 0}],
    "dns": {"nameservers": ["10.96.0.10"]},
}


def env(command, **over):
    vars = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee12",
        "CNI_NETNS": "/proc/self/ns/net",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee12;K8S_POD_UID={UID}",
        "CNI_PATH": "/opt/cni/bin",
    }
    vars.update(over)
    return "".join(f"{k}={v}\n" for k, v in vars.items() if v is not None)


def conf(version="1.0.0", prev=PREV_1, **extra):
    c = {
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "sluice-cni",
        "agentSocket": "/var/run/sluice/cni.sock",
        "failClosed": True,
        "excludeNamespaces": ["kube-system", "sluice-system"],
        "logFile": FUZZ_LOG,
    }
    c.update(extra)
    if prev is not None:
        c["prevResult"] = prev
    return json.dumps(c)


def cni_plugin():
    t = "cni_plugin"
    write(t, "add-captured", env("ADD") + "AGENT=captured\n\n" + conf())
    write(t, "add-not-enrolled", env("ADD") + "AGENT=not-enrolled\n\n" + conf())
    write(t, "add-convert-1.0-to-0.4", env("ADD") + "\n" + conf("0.4.0"))
    write(t, "add-convert-0.4-to-1.0", env("ADD") + "\n" + conf("1.0.0", PREV_04))
    write(t, "add-0.3.1", env("ADD") + "\n" + conf("0.3.1", PREV_04))
    write(t, "add-excluded", env("ADD", CNI_ARGS=f"K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;K8S_POD_UID={UID}") + "\n" + conf())
    write(t, "add-agent-down-closed", env("ADD") + "AGENT=down\n\n" + conf())
    write(t, "add-agent-down-open", env("ADD") + "AGENT=down\n\n" + conf(failClosed=False))
    write(t, "add-agent-error", env("ADD") + "AGENT=error\n\n" + conf())
    write(t, "add-agent-wrong-answer", env("ADD") + "AGENT=removed\n\n" + conf())
    write(t, "add-no-prev-result", env("ADD") + "\n" + conf(prev=None))
    write(t, "add-no-cni-args", env("ADD", CNI_ARGS=None) + "\n" + conf())
    write(t, "add-bad-uid", env("ADD", CNI_ARGS="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0") + "\n" + conf())
    write(t, "add-netns-missing", env("ADD", CNI_NETNS="/var/run/netns/gone") + "\n" + conf())
    write(t, "add-no-log", env("ADD") + "\n" + json.dumps({"cniVersion": "1.1.0", "name": "net", "type": "sluice-cni", "prevResult": PREV_1}))
    write(t, "del", env("DEL") + "AGENT=removed\n\n" + conf(prev=None))
    write(t, "del-minimal", "CNI_COMMAND=DEL\nCNI_CONTAINERID=c0ffee12\nCNI_IFNAME=eth0\nAGENT=down\n\n" + conf(prev=None))
    write(t, "check", env("CHECK") + "AGENT=captured\n\n" + conf())
    write(t, "check-missing", env("CHECK") + "AGENT=error\n\n" + conf())
    write(t, "status", "CNI_COMMAND=STATUS\nAGENT=ready\n\n" + conf("1.1.0", prev=None))
    write(t, "status-down", "CNI_COMMAND=STATUS\nAGENT=down\n\n" + conf("1.1.0", prev=None))
    gc = conf("1.1.0", prev=None, **{"cni.dev/valid-attachments": [{"containerID": "c0ffee12", "ifname": "eth0"}]})
    write(t, "gc", "CNI_COMMAND=GC\nCNI_PATH=/opt/cni/bin\nAGENT=removed\n\n" + gc)
    write(t, "gc-old-version", "CNI_COMMAND=GC\nAGENT=removed\n\n" + conf("1.0.0", prev=None))
    write(t, "version", "CNI_COMMAND=VERSION\n\n" + json.dumps({"cniVersion": "1.0.0"}))
    write(t, "unknown-command", "CNI_COMMAND=FROB\n\n{}")
    write(t, "unsupported-version", env("ADD") + "\n" + conf("0.2.0"))
    write(t, "wrong-type", env("ADD") + "\n" + conf(type="bridge"))


def cni_agent_request():
    t = "cni_agent_request"
    pod = {"uid": UID, "name": "web-0", "namespace": "shop", "netns": "/proc/self/ns/net", "containerId": "c0ffee12", "ifname": "eth0", "ips": ["10.10.1.130", "fd10:1::82"]}
    write(t, "add", json.dumps({"command": "ADD", "pod": pod, "validAttachments": []}) + "\n")
    write(t, "del", json.dumps({"command": "DEL", "pod": dict(pod, uid="", netns="", ips=[])}) + "\n")
    write(t, "check", json.dumps({"command": "CHECK", "pod": pod}) + "\n")
    write(t, "status", json.dumps({"command": "STATUS"}) + "\n")
    write(t, "gc", json.dumps({"command": "GC", "validAttachments": [{"containerId": "c0ffee12", "ifname": "eth0"}, {"containerId": "deadbeef", "ifname": "net1"}]}) + "\n")
    write(t, "response-captured", json.dumps({"result": {"Ok": "captured"}, "detail": f"pod shop/web-0 ({UID}): captured"}) + "\n")
    write(t, "response-not-enrolled", json.dumps({"result": {"Ok": "notEnrolled"}, "detail": "namespace not labelled"}) + "\n")
    write(t, "response-error", json.dumps({"result": {"Err": "K8S_POD_UID \"x\" is not a pod UID"}, "detail": ""}) + "\n")
    write(t, "response-ready", json.dumps({"result": {"Ok": "ready"}}) + "\n")


BRIDGE = """{
  "cniVersion": "1.0.0",
  "name": "mynet",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.22.0.0/16"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"""
CALICO = "{\r\n\t\"name\": \"k8s-pod-network\",\r\n\t\"cniVersion\": \"0.3.1\",\r\n\t\"plugins\": [\r\n\t\t{\r\n\t\t\t\"type\": \"calico\",\r\n\t\t\t\"log_level\": \"info\",\r\n\t\t\t\"datastore_type\": \"kubernetes\",\r\n\t\t\t\"nodename\": \"node1\",\r\n\t\t\t\"mtu\": 0,\r\n\t\t\t\"ipam\": {\"type\": \"calico-ipam\"},\r\n\t\t\t\"policy\": {\"type\": \"k8s\"},\r\n\t\t\t\"kubernetes\": {\"kubeconfig\": \"/etc/cni/net.d/calico-kubeconfig\"}\r\n\t\t},\r\n\t\t{\"type\": \"portmap\", \"snat\": true, \"capabilities\": {\"portMappings\": true}},\r\n\t\t{\"type\": \"bandwidth\", \"capabilities\": {\"bandwidth\": true}}\r\n\t]\r\n}\r\n"
CILIUM = "{\n  \"cniVersion\": \"0.3.1\",\n  \"name\": \"cilium\",\n  \"plugins\": [\n    {\n       \"type\": \"cilium-cni\",\n       \"enable-debug\": false,\n       \"log-file\": \"/var/run/cilium/cilium-cni.log\"\n    }\n  ]\n}"
FLANNEL = """{
    "type": "flannel",
    "name": "cbr0",
    "cniVersion": "0.3.1",
    "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
    }
}
"""
LOOPBACK = '{"cniVersion":"0.3.1","name":"lo","type":"loopback"}'
PODMAN = """{
   "cniVersion": "1.0.0",
   "cniVersions": ["0.4.0", "1.0.0"],
   "name": "podman",
   "plugins": [
      {
         "type": "bridge",
         "bridge": "cni-podman0",
         "isGateway": true,
         "ipMasq": true,
         "hairpinMode": true,
         "ipam": {
            "type": "host-local",
            "routes": [{ "dst": "0.0.0.0/0" }],
            "ranges": [[{ "subnet": "10.88.0.0/16", "gateway": "10.88.0.1" }]]
         }
      },
      { "type": "portmap", "capabilities": { "portMappings": true } },
      { "type": "firewall" },
      { "type": "tuning" }
   ]
}
"""
KINDNET = '{\n\t"cniVersion": "0.3.1",\n\t"name": "kindnet",\n\t"plugins": [\n\t{\n\t\t"type": "ptp",\n\t\t"ipMasq": false,\n\t\t"ipam": {\n\t\t\t"type": "host-local",\n\t\t\t"dataDir": "/run/cni-ipam-state",\n\t\t\t"routes": [{ "dst": "0.0.0.0/0" }],\n\t\t\t"ranges": [[{ "subnet": "10.244.0.0/24" }]]\n\t\t},\n\t\t"mtu": 1500\n\t},\n\t{\n\t\t"type": "portmap",\n\t\t"capabilities": {"portMappings": true}\n\t}\n\t]\n}\n'
SLUICE_ENTRY = {
    "type": "sluice-cni",
    "agentSocket": "/var/run/sluice/cni.sock",
    "failClosed": True,
    "excludeNamespaces": ["kube-system", "sluice-system"],
    "logFile": "/var/run/sluice/sluice-cni.log",
}


def cni_conflist():
    t = "cni_conflist"
    # Flags: bits 0-1 the name (0 .conflist, 1 .conf, 2 .json); bit 2 a
    # valid 20-bridge.conflist after it; bit 3 mode 0600.
    write(t, "bridge.conflist", b"\x00" + BRIDGE.encode())
    write(t, "calico-crlf.conflist", b"\x08" + CALICO.encode())
    write(t, "cilium.conflist", b"\x00" + CILIUM.encode())
    write(t, "flannel.conf", b"\x01" + FLANNEL.encode())
    write(t, "loopback.json", b"\x02" + LOOPBACK.encode())
    write(t, "podman-cniversions.conflist", b"\x00" + PODMAN.encode())
    write(t, "kindnet.conflist", b"\x04" + KINDNET.encode())
    with_us = json.loads(BRIDGE)
    with_us["plugins"].insert(1, SLUICE_ENTRY)
    write(t, "already-installed.conflist", b"\x00" + json.dumps(with_us, indent=2).encode())
    write(t, "only-sluice.conflist", b"\x00" + json.dumps({"cniVersion": "1.0.0", "name": "x", "plugins": [SLUICE_ENTRY]}).encode())
    write(t, "invalid-then-bridge", b"\x04" + b'{"cniVersion": "1.0.0", "name": "broken", "plugins": []}')
    write(t, "old-version.conflist", b"\x00" + BRIDGE.replace("1.0.0", "0.2.0").encode())
    write(t, "not-utf8.conflist", b"\x04" + BRIDGE.encode().replace(b"mynet", b"my\xffnet"))
    installed = json.loads(BRIDGE)
    installed["plugins"].append(SLUICE_ENTRY)
    rendered = json.dumps(installed, indent=2) + "\n"
    state = {
        "original": {"file": "10-net.conflist", "mode": 0o644, "content": BRIDGE, "exact": True},
        "installed": {"file": "10-net.conflist", "content": rendered},
    }
    write(t, "with-state", b"\x00" + rendered.encode() + b"\x00" + json.dumps(state).encode())
    converted = dict(state, original={"file": "10-net.conf", "mode": 0o644, "content": FLANNEL, "exact": True})
    write(t, "with-state-converted", b"\x00" + rendered.encode() + b"\x00" + json.dumps(converted).encode())
    write(t, "bad-state", b"\x00" + BRIDGE.encode() + b"\x00" + b'{"original": {"file": "../../etc/passwd"}}')


if __name__ == "__main__":
    hbone_frames()
    hbone_request()
    cni_plugin()
    cni_agent_request()
    cni_conflist()
