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
`;
