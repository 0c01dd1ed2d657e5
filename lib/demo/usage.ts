/** Help text of `epd-transfer demo` (kept apart so `epd-transfer help` loads nothing else). */
export const DEMO_USAGE = `  demo [options]                 the whole E/P/D system on this machine (SIMULATED compute, real
                                 transfers): proxy and workers as processes, an OpenAI-client load,
                                 a summary table and an HTML report
      --topology <t>             1e1pd, 1e1p1d or 2e2p2d (1e1p1d)
      --requests <n>             requests in the load (40)
      --concurrency <n>          requests in flight (4)
      --model <id>               model profile (qwen2.5-vl-7b; a profile without vision: text only)
      --report <file>            HTML report (./epd-demo-report.html; '-' for none)
      --json                     one JSON object on stdout instead of the table
      --seed <n>                 seed of the request mix (1)
      --metadata <etcd://h:p>    at scale: workers register in etcd, proxies discover them there
                                 (etcd must be running; the demo says how to start one)
      --proxies <n>              proxies sharing the instances through etcd; the client balances (1)
      --netns auto|on|off        with --metadata: each worker in its own network namespace (auto:
                                 where the host allows it, i.e. root and ip netns)
      --kill <process>@<n>       fault injection: SIGKILL proxy-1, decode-0, … once n requests completed
`;
