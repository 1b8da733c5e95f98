// `make bench`: runs every bench/*.bench.ts one after another (they measure, so they
// must not share the two cores) and prints their figures. Never part of `make test`.
import { spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';

const filter = process.argv[2] ? new RegExp(process.argv[2]) : undefined;
const files = readdirSync(import.meta.dirname)
  .filter((name) => name.endsWith('.bench.ts') && (!filter || filter.test(name)))
  .sort();
let failed = 0;
for (const file of files) {
  console.log(`\n── ${file}`);
  const result = spawnSync(process.execPath, [join(import.meta.dirname, file)], { stdio: 'inherit' });
  if (result.status !== 0) failed++;
}
process.exit(failed > 0 ? 1 : 0);
