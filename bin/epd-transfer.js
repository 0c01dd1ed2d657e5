#!/usr/bin/env node
// The epd-transfer command. The implementation is lib/cli.ts (compiled to dist/).
import { main } from '../dist/lib/cli.js';

process.exitCode = await main(process.argv.slice(2));
