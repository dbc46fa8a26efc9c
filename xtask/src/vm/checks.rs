//! What the matrix checks on every kernel. One entry of [`CHECKS`] is one
//! column of the table: what to run in the guest and what each kernel is
//! expected to do. A check of a feature that has not landed is
//! [`Run::NotYet`] (or names a test target that does not exist yet) and
//! shows as `n/a`; when the feature lands, point it at its test.
//!
//! Expectations are per kernel on purpose: an old kernel refusing a program
//! is a finding, recorded here with the reason and the exact error text
//! ([`Expect::Fail::signature`]) so that any *other* failure still fails
//! the run, and so does the expected failure going away (update the entry).

/// How a check runs inside the guest.
pub enum Run {
    /// `sluice <subcommand> <args>`; `n/a` while `sluice --help` does not list it.
    Sluice { subcommand: &'static str, args: &'static [&'static str] },
    /// A workspace integration-test executable (`cargo test --test <target>`),
    /// run whole with `<args>`; `n/a` while the target does not exist.
    Test { package: &'static str, target: &'static str, args: &'static [&'static str] },
    /// The feature is not in the tree yet: always `n/a`, with this reason.
    NotYet(&'static str),
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

pub const CHECKS: &[Check] = &[
    Check {
        name: PROBE,
        column: "probe",
        run: Run::Sluice { subcommand: "probe", args: &[] },
        expect: &[],
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
    // Today's capture (`--redirect auto|iptables`), both backends. One test
    // is skipped: legacy_backend_and_detection compares `ip6tables-legacy-save`
    // output with the expected rules after removing only ` [0:0]` counters,
    // and in a slow guest the pod's IPv6 MLD reports (sent up to a second
    // after link-up) cross the mangle chains after the rules are in, so the
    // built-in chains print e.g. `[2:152]` and the comparison fails on any
    // kernel (seen on 5.10 and 6.12, passed on 6.1). The test needs to strip
    // every `[packets:bytes]`; then drop the --skip.
    Check {
        name: "iptables-capture",
        column: "iptables capture",
        run: Run::Test {
            package: "sluice",
            target: "iptables_redirect",
            args: &["--test-threads=1", "--skip", "legacy_backend_and_detection"],
        },
        expect: &[],
        timeout_secs: 150,
    },
    Check {
        name: "outbound-capture",
        column: "outbound capture",
        run: Run::NotYet("eBPF capture (cgroup/connect4 to 15001) has not landed: --redirect ebpf fails"),
        expect: &[],
        timeout_secs: 150,
    },
    Check {
        name: "tc-inbound",
        column: "tc inbound",
        run: Run::NotYet("tc ingress with bpf_sk_assign to 15006 has not landed"),
        expect: &[],
        timeout_secs: 150,
    },
    Check {
        name: "same-node-splice",
        column: "same-node splice",
        run: Run::NotYet("same-node socket splice (agent hands both sockets to sk_msg) has not landed"),
        expect: &[],
        timeout_secs: 150,
    },
    Check {
        name: "iptables-fallback",
        column: "iptables fallback",
        run: Run::NotYet("automatic fallback to iptables when the probe fails has not landed"),
        expect: &[],
        timeout_secs: 150,
    },
];
