// What every benchmark shares: timing, medians and the report lines it prints.
export const results: string[] = [];

/** Prints a figure and keeps it (a bench may print them again as a summary). */
export function report(line: string): void {
  results.push(line);
  console.log(line);
}

export const median = (values: number[]): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
export const seconds = (start: number): number => (performance.now() - start) / 1000;
export const mb = (bytes: number): string => `${(bytes / 1e6).toFixed(1)} MB`;
export const rate = (bytes: number, s: number): string => `${(bytes / 1e6 / s).toFixed(0)} MB/s`;
