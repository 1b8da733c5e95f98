// Many items of one stage side by side (downloads, image copies): one listr2 line each, at
// most `jobs` at a time, every item tried even when another fails. Then the one failure
// as it is, or all of them in one error that says how many failed.
import pLimit from 'p-limit';
import { UserError } from '../errors.ts';
import type { StageTask } from './stage.ts';

export interface FanOut<T> {
  jobs: number;
  signal: AbortSignal;
  title: (item: T) => string;
  /** What the items are, for the error when several fail: "artifacts", "images". */
  what: string;
}

export async function fanOut<T>(task: StageTask, items: readonly T[], options: FanOut<T>, run: (item: T, sub: StageTask) => Promise<void>): Promise<void> {
  const limit = pLimit(options.jobs);
  const failures: Error[] = [];
  const subtasks = task.newListr(
    items.map((item) => ({
      title: options.title(item),
      task: (_: unknown, sub: StageTask) =>
        limit(async () => {
          try {
            await run(item, sub);
          } catch (error) {
            failures.push(error as Error);
            throw error;
          }
        }),
    })),
    { concurrent: true, exitOnError: false, rendererOptions: { collapseSubtasks: false } },
  );
  await subtasks.run();
  if (options.signal.aborted) throw options.signal.reason;
  if (failures.length === 1) throw failures[0];
  if (failures.length > 1) throw new UserError(`${failures.length} ${options.what} failed:\n\n${failures.map((e) => e.message).join('\n\n')}`);
}
