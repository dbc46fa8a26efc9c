//! What the matrix checks on every kernel. One entry of [`CHECKS`] is one
//! column of the table: what to run in the guest and what each kernel is
//! expected to do. Add a check when its feature lands, pointed at its test.
//! There is no "not applicable": a check whose test target or subcommand
//! does not exist (renamed, deleted, not built) is **MISSING** and fails
//! the run, like a check that skipped or ran no test.
//!
//! Expectations are per kernel on purpose: an old kernel refusing a program
//! is a finding, recorded here with the reason and the exact error text
//! ([`Expect::Fail::signature`]) so that any *other* failure still fails
//! the run, and so does the expected failure going away (update the entry).

/// How a check runs inside the guest.
pub enum Run {
    /// `sluice <subcommand> <args>`; MISSING (a failure) while `sluice
    /// --help` does not list it.
    Sluice { subcommand: &'static str, args: &'static [&'static str] },
    /// A workspace integration-test executable (`cargo test --test <target>`),
    /// run whole with `<args>`; MISSING (a failure) while the target does
    /// not exist.
    Test { package: &'static str, target: &'static str, args: &'static [&'static str] },
}

/// What one kernel is expected to do with one check.
#[derive(Clone, Copy)]
pub enum Expect {
    Pass,
    /// The check must fail and its output must contain `signature`.
    Fail {
        signature: &'static str,
        why: &'static str,
    },
}

pub struct Check {
    /// The id in the guest's `SLUICE-CHECK <name> ...` lines.
    pub name: &'static str,
    /// The column header.
    pub column: &'static str,
    pub run: Run,
    /// Per-kernel exceptions, by kernel label; every other kernel: [`Expect::Pass`].
    pub expect: &'static [(&'static str, Expect)],
    /// Seconds the guest gives it before killing it (TCG is slow: a debug
    /// test that takes 2 s on the host takes 10–30 s here).
    pub timeout_secs: u32,
}

impl Check {
    pub fn expect_on(&self, kernel: &str) -> Expect {
        self.expect.iter().find(|(k, _)| *k == kernel).map(|(_, e)| *e).unwrap_or(Expect::Pass)
    }
}

/// The name of the check whose output names the redirect mode.
pub const PROBE: &str = "probe";

/// `bpf_get_netns_cookie` became callable from sock_ops and sk_msg programs
/// in 5.15 (commits 6cf1770d63dd "bpf: Allow bpf_get_netns_cookie in
/// BPF_PROG_TYPE_SOCK_OPS" and fab60e29fcc6, the same for SK_MSG). Both
/// `sluice_sockops` and `sluice_sk_msg` call it to key SOCK_PAIRS by netns,
/// so the 5.10 verifier rejects both (the agent stops at the first, sock_ops:
/// `6: (85) call bpf_get_netns_cookie#122` / `unknown func
/// bpf_get_netns_cookie#122`). Kernels < 5.15 need a variant of both
/// programs (agent-ebpf); until then the socket bypass does not load there.
const NETNS_COOKIE_NEEDS_5_15: Expect = Expect::Fail {
    signature: "unknown func bpf_get_netns_cookie#122",
    why: "sock_ops and sk_msg call bpf_get_netns_cookie, which those program types may call only from 5.15",
};

/// `sluice probe` exits 2 when eBPF mode is impossible; on 5.10 that is by
/// design (the helpers above), and `auto` picks iptables.
const PROBE_SAYS_IPTABLES: Expect = Expect::Fail {
    signature: "--redirect auto would choose: iptables",
    why: "the probe finds get_netns_cookie missing for sock_ops/sk_msg and the verifier rejecting the programs; \
          exit 2, auto picks iptables",
};

/// `--redirect ebpf` refuses to start where the probe fails (5.10, above), so
/// each tunnel test fails at its eBPF half, after its iptables half passed.
const EBPF_MODE_REFUSED: Expect = Expect::Fail {
    signature: "get_netns_cookie@sock_ops",
    why:
        "--redirect ebpf refuses to start: the probe lacks get_netns_cookie@sock_ops/@sk_msg (the iptables half passed)",
};

pub const CHECKS: &[Check] = &[
    Check {
        name: PROBE,
        column: "probe",
        run: Run::Sluice { subcommand: "probe", args: &[] },
        expect: &[("5.10", PROBE_SAYS_IPTABLES)],
        timeout_secs: 60,
    },
    Check {
        name: "programs-load",
        column: "programs load",
        run: Run::Test { package: "sluice", target: "programs_load", args: &["--test-threads=1"] },
        expect: &[("5.10", NETNS_COOKIE_NEEDS_5_15)],
        timeout_secs: 120,
    },
    Check {
        name: "sockmap-bypass",
        column: "sockmap bypass",
        run: Run::Test { package: "sluice-tests", target: "sockmap_bypass", args: &["--test-threads=1"] },
        expect: &[("5.10", NETNS_COOKIE_NEEDS_5_15)],
        timeout_secs: 150,
    },
    // Today's iptables capture, both backends.
    Check {
        name: "iptables-capture",
        column: "iptables capture",
        run: Run::Test { package: "sluice", target: "iptables_redirect", args: &["--test-threads=1"] },
        expect: &[],
        timeout_secs: 150,
    },
    // Two nodes, pod to pod over HBONE, iptables then eBPF mode; in eBPF
    // mode the client's connect6 is rewritten to 15001 (IPv6: the harder
    // family for connect hooks and SO_ORIGINAL_DST).
    Check {
        name: "outbound-capture",
        column: "outbound capture",
        run: Run::Test { package: "sluice-tests", target: "tunnel", args: &["--exact", "ipv6_pod_to_pod"] },
        expect: &[("5.10", EBPF_MODE_REFUSED)],
        timeout_secs: 170,
    },
    // Unenrolled pods connect to an enrolled one: in eBPF mode tc ingress
    // hands the SYN to the pod's assign listener with bpf_sk_assign (counter
    // inbound_assigned). This matrix found it failing on 6.1: before 6.5,
    // bpf_sk_assign refuses SO_REUSEPORT listeners; the assign listener is
    // now a non-reuseport socket on an ephemeral port.
    Check {
        name: "tc-inbound",
        column: "tc inbound",
        run: Run::Test {
            package: "sluice-tests",
            target: "tunnel",
            args: &["--exact", "unenrolled_pods_reach_enrolled_and_plain_pods"],
        },
        expect: &[("5.10", EBPF_MODE_REFUSED)],
        timeout_secs: 170,
    },
    // Two enrolled pods on one node: after authorization sk_msg pushes each
    // app's bytes into the agent's socket facing the other; the takeover is
    // byte-exact from the first byte and both half-closes arrive.
    Check {
        name: "same-node-splice",
        column: "same-node splice",
        run: Run::Test {
            package: "sluice-tests",
            target: "splice",
            args: &["--exact", "takeover_and_half_close_lose_nothing"],
        },
        expect: &[("5.10", EBPF_MODE_REFUSED)],
        timeout_secs: 300,
    },
    // A probe forced to miss sk_assign makes `--redirect ebpf` refuse and
    // `auto` fall back to iptables with the reason logged; the other node
    // must pick eBPF, which 5.10 cannot.
    Check {
        name: "iptables-fallback",
        column: "iptables fallback",
        run: Run::Test {
            package: "sluice-tests",
            target: "tunnel",
            args: &["--exact", "missing_kernel_feature_falls_back_to_iptables_with_the_reason"],
        },
        expect: &[(
            "5.10",
            Expect::Fail {
                signature: "node2 has everything: eBPF",
                why: "the fallback itself works; the test's other node expects eBPF, which 5.10 cannot run",
            },
        )],
        timeout_secs: 170,
    },
];
