#!/usr/bin/env node
// corekube's command line: `node tasks/cli.ts [options] TASK...` (the Makefile's targets
// call it). This file only turns on Node's compile cache, then loads the command line
// (tasks/command-line.ts) and with it every module: loaded after this, they are compiled
// once and read back from the cache on every later run, so a no-op run starts in about
// 0.1 s whether make or a person starts it. NODE_COMPILE_CACHE names another directory;
// NODE_DISABLE_COMPILE_CACHE=1 turns it off.
// Where the cache cannot be written (a read-only checkout), Node runs without it.
import { enableCompileCache } from 'node:module';
import { join } from 'node:path';

enableCompileCache(process.env.NODE_COMPILE_CACHE || join(import.meta.dirname, '..', 'cache', 'node-compile-cache'));
await import('./command-line.ts');
