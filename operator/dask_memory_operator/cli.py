"""``dask-memory-operator``: run the operator, or the whole stack on this machine."""

from __future__ import annotations

import argparse
import secrets
import sys
import weakref

COMMANDS_HELP = """\
commands:
  run       run the operator against the current kubeconfig or in-cluster config
  check     exit 0 when the MemoryPolicy CRD is established and the operator is live
            (the Helm chart's test)
  report    write a cluster's memory report (memory over time, what the operator did,
            what it saved) as a self-contained HTML page
  sandbox   run an emulated Kubernetes API, dask-kubernetes, this operator and real
            Dask processes on this machine, and the demos on them: the AMM's dot
            product, and a busy scale-down with and without the MemoryPolicy; then
            writes the demo cluster's memory report
"""


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the operator")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[],
                       help="watch only this namespace (repeatable; glob patterns allowed)")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch every namespace (the default)")
    p.add_argument("--namespace-selector", metavar="LABEL=VALUE", type=_label_selector, default=None,
                   help="act only in namespaces with this label (a cluster admin opts them in), "
                        "e.g. dask-memory-operator.io/governed=true; default: every watched namespace")
    p.add_argument("--scheduler-access", choices=["auto", "pod-ip", "port-forward", "dns", "cluster-ip"],
                   default="auto",
                   help="how to reach a cluster's own scheduler pod (never through its Service, "
                        "which a tenant can redirect): pod-ip in a pod or where pod IPs are "
                        "routable, port-forward from a laptop (auto picks one of those); dns and "
                        "cluster-ip are deprecated names of pod-ip")
    p.add_argument("--allow-policy-class", action="append", default=[], metavar="PATTERN",
                   help="dotted path or glob of AMM policy classes a MemoryPolicy may name "
                        "besides the built-in ones (repeatable): mycompany.amm.* is the classes "
                        "of module mycompany.amm (* does not cross a dot), mycompany.amm.** "
                        "those of its submodules too; schedulers whose pods the webhook admits "
                        "get the same list (dask config amm-core.allowed-policy-classes)")
    p.add_argument("--resync-interval", type=float, default=10.0, metavar="SECONDS",
                   help="how often every MemoryPolicy is compared with its schedulers")
    p.add_argument("--rpc-timeout", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--peering", metavar="NAME",
                   help="kopf peering name for several replicas: a ClusterKopfPeering, also "
                        "with --namespace (a namespace's KopfPeering is writable by its "
                        "tenants); default: standalone (never the peering of dask-kubernetes' "
                        "operator)")
    p.add_argument("--priority", type=int, default=None,
                   help="kopf peering priority; with --peering the default is a random one "
                        "per process, as kopf pauses every peer when two share the highest")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics on this port (0: off)")
    p.add_argument("--metrics-address", default="0.0.0.0",
                   help="address the metrics server listens on")
    p.add_argument("--liveness", metavar="URL", default=None,
                   help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    hook = p.add_argument_group("admission webhook (pods of governed clusters born governed)")
    hook.add_argument("--webhook-port", type=int, default=0,
                      help="serve the mutating webhook over HTTPS on this port (0: off)")
    hook.add_argument("--webhook-address", default="0.0.0.0", help="address to listen on")
    hook.add_argument("--webhook-host", default=None,
                      help="host name or IP the API server reaches the webhook at (in the "
                           "certificate's names)")
    hook.add_argument("--webhook-cert-dir", default=None, metavar="DIR",
                      help="tls.crt and tls.key (and ca.crt) mounted from a Secret, reloaded "
                           "when they change; without it a certificate is made for local "
                           "use (its CA's path is logged)")
    hook.add_argument("--webhook-client-ca", default=None, metavar="FILE",
                      help="answer only clients with a certificate signed by this CA (the API "
                           "server's webhook client certificate, from its AdmissionConfiguration); "
                           "without it anyone reaching the port gets answers")
    hook.add_argument("--webhook-client-name", action="append", default=[], metavar="NAME",
                      help="and whose certificate carries this name as CN or DNS SAN "
                           "(repeatable; needs --webhook-client-ca)")
    p.add_argument("--verbose", "-v", action="store_true")


def _label_selector(text: str) -> tuple[str, str]:
    from dask_memory_operator.controllers.config import parse_selector

    try:
        return parse_selector(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_check(sub: argparse._SubParsersAction) -> None:
    from dask_memory_operator.check import DEFAULT_CRD

    p = sub.add_parser("check", help="check that the operator is installed and live")
    p.add_argument("--crd", default=DEFAULT_CRD, help="the CRD that must be Established")
    p.add_argument("--healthz", metavar="URL", default=None,
                   help="the operator's liveness endpoint, which must answer 200")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="keep asking for this long before failing")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="write a DaskCluster's memory report (HTML)",
        description="The memory of a governed DaskCluster over time, its workers, what the operator did "
                    "(retirements, scale-ups and -downs, OOM kills, policy changes) and what it saved, "
                    "as one self-contained HTML page; read from the cluster's scheduler and the "
                    "Kubernetes API of the kubeconfig in use.")
    p.add_argument("target", metavar="NAMESPACE/CLUSTER",
                   help="the DaskCluster; with --policy, NAMESPACE alone for all its clusters")
    p.add_argument("--policy", metavar="NAME",
                   help="report every DaskCluster this MemoryPolicy governs, a section each on one page")
    p.add_argument("--png", action="store_true", help="also write each cluster's figure as a PNG beside the page")
    p.add_argument("-o", "--output", metavar="PATH", default=None,
                   help="the page's path (default: memory-report-NAMESPACE-CLUSTER.html, or "
                        "memory-report-NAMESPACE-policy-NAME.html, in the current directory)")
    p.add_argument("--scheduler-access", choices=["auto", "pod-ip", "port-forward"], default="auto",
                   help="how to reach the scheduler pod: port-forward through the API server (auto, "
                        "outside a pod), or its pod IP (auto in a pod; the sandbox's pods are local)")
    p.add_argument("--scheduler-address", metavar="tcp://HOST:PORT", default=None,
                   help="reach the scheduler here instead (e.g. your own kubectl port-forward)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="for each call to the scheduler")


def _add_sandbox(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sandbox", help="run the whole stack and the demo on this machine")
    p.add_argument("--keep", action="store_true",
                   help="stay up after the demo and print a kubeconfig for kubectl")
    p.add_argument("--demo", choices=["amm", "scale-down", "all"], default="all",
                   help="amm: a dot product with the AMM on and off; scale-down: a busy 6 -> 3 "
                        "scale-down, Deployments deleted from outside, then through the policy")
    p.add_argument("--size", type=int, default=8000, help="matrix side of the AMM demo")
    p.add_argument("--chunk", type=int, default=1000, help="chunk side of the AMM demo")
    p.add_argument("--rows", type=int, default=12_000,
                   help="rows of the scale-down demo's data (x 2,000 float64, 8 MB a 1,000 rows)")
    p.add_argument("--report", default="memory-report-default-demo.html", metavar="PATH",
                   help="where the demo cluster's memory report is written")
    p.add_argument("--state-dir", default=None, help="where logs and kubeconfig go")


def peering_priority(args: argparse.Namespace) -> int | None:
    """The replica's kopf peering priority. Replicas of one Deployment share their
    arguments, and kopf pauses all peers of the same top priority ("Pausing all
    operators, including self"): each draws its own, so the highest is active and
    the others stand by."""
    if args.priority is not None or args.peering is None:
        return args.priority
    return secrets.randbelow(2**31 - 1) + 1


def run(args: argparse.Namespace) -> int:
    import kopf
    from dask_memory_operator.untrusted import raise_recursion_limit; raise_recursion_limit()  # JSON 10,000 deep
    from prometheus_client import start_http_server

    from dask_memory_operator.schedulers.locator import SchedulerLocator
    from dask_memory_operator.controllers.config import OperatorConfig, WebhookConfig
    from dask_memory_operator.controllers.registry import build_registry, operator_watches
    from dask_memory_operator.schedulers.converge import ClusterReconciler

    if args.peering == "default":
        # dask-kubernetes' operator runs with kopf's default peering; sharing it
        # would pause one of the two operators.
        raise SystemExit("--peering default would pause the dask-kubernetes operator; pick another name")
    if args.webhook_client_name and not args.webhook_client_ca:
        raise SystemExit("--webhook-client-name needs --webhook-client-ca (the names of a verified certificate)")
    config = OperatorConfig(
        allowed_policy_classes=tuple(args.allow_policy_class),
        resync_interval=args.resync_interval,
        webhook=WebhookConfig(
            port=args.webhook_port, address=args.webhook_address, host=args.webhook_host,
            cert_dir=args.webhook_cert_dir, client_ca=args.webhook_client_ca,
            client_names=tuple(args.webhook_client_name),
        ) if args.webhook_port else None,
        peered=args.peering is not None,
        namespace_selector=args.namespace_selector,
    )
    kopf.configure(verbose=args.verbose)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_address)
    watches = operator_watches(args.namespace, webhook=config.webhook is not None)
    memo = kopf.Memo(
        config=config,
        watches=watches,
        reconciler=ClusterReconciler(
            SchedulerLocator(args.scheduler_access, watches=watches), rpc_timeout=args.rpc_timeout
        ),
        policy_locks=weakref.WeakValueDictionary(),
        cluster_labels={},
    )
    kopf.run(
        registry=build_registry(config),
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=peering_priority(args),
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
        memo=memo,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line (the Helm chart's test parses its rendered arguments with it)."""
    parser = argparse.ArgumentParser(
        prog="dask-memory-operator",
        description="Active Memory Manager policies for dask-kubernetes clusters.",
        epilog=COMMANDS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_check(sub)
    _add_report(sub)
    _add_sandbox(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "check":
        from dask_memory_operator.check import main as check

        return check(args.crd, args.healthz, args.timeout)
    if args.command == "report":
        from dask_memory_operator.observability.report_data import main as report

        return report(args)
    try:
        from dmo_devstack.sandbox import sandbox
    except ModuleNotFoundError as exc:
        if exc.name != "dmo_devstack":
            raise
        print("dask-memory-operator sandbox: the sandbox is the project's dev stack, not part of the operator: "
              "from a checkout, `pip install -e . -e ./devstack`", file=sys.stderr)
        return 2
    return sandbox(args)


if __name__ == "__main__":
    sys.exit(main())
