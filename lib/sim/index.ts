/** Simulated E/P/D workers over the real library, for the demo, benchmarks and tests. See docs/DEMO.md. */
export { SimWorker, simulationLabel } from './worker.js';
export type { SimWorkerOptions } from './worker.js';
export { SharedStoreLocator } from './locator.js';
export type { SimRole, WorkerStats, SimRequestRecord, EcCounters, KvCounters } from './stats.js';
