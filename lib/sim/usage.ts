/** Help text of `epd-transfer worker` (kept apart so `epd-transfer help` loads nothing else). */
import { PROFILES } from './profiles.js';

/** The `worker` lines of `epd-transfer help`. */
export const WORKER_USAGE = `  worker --role <role> [options]  a SIMULATED E, P, D or PD instance (vLLM's HTTP API; real transfers)
      --role encode|prefill|decode|pd
      --model <id>               model profile (qwen2.5-vl-7b); one of
                                 ${Object.keys(PROFILES).join(', ')}
      --served-model-name <name> model name in /v1/models and answers (the profile id)
      --host <addr>              listen address, HTTP and decode's transfer engine (127.0.0.1)
      --port <n>                 HTTP port (0: any free port, printed)
      --ec-store <name>          shared encoder-cache store; same name = same cache (epd-sim)
      --ec-capacity <size>       its capacity when this worker creates it (2GiB)
      --kv-memory <size>         simulated KV cache (512MiB)
      --max-batched-tokens <n>   prompt tokens per prefill step (8192)
      --kv-timeout <t>           decode: deadline of a request's KV and metaserver call (120s)
      --block-wait <t>           longest wait for free KV blocks before 503 (30s)
      --kv-quiesce <t>           decode: blocks of a failed request stay held this long unless
                                 its prefill confirms it stopped writing (30s)
      --corrupt-kv <id,...>      fault injection (prefill): corrupt one KV byte of the requests with
                                 these ids (X-Request-Id); decode's byte check must fail them
      --metadata <etcd://h:p/pfx> publish the transfer engine in etcd (default: embedded handshake)
      --metadata-ttl <s>         etcd lease TTL: how long a killed worker stays registered (10)
      --engine-name <name>       the transfer engine's name (sim-<role>-<pid>)
      --transport auto|shm|tcp   how the engine reaches peers; tcp crosses the network even on one
                                 host (auto)
      --register                 register in etcd's instance registry (cluster proxies find it)
      --remote-ec                encoder cache across hosts: encoders serve their store and announce
                                 it in etcd; prefill/pd pull what they lack (needs --metadata)
`;
