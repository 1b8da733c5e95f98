// IPv4 addresses and CIDR ranges: just what the cluster config needs to check.

export interface Cidr {
  text: string; // canonical "a.b.c.d/n"
  network: number; // unsigned 32-bit
  prefix: number;
}

const octet = '(25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)';
const ipv4Pattern = new RegExp(`^${octet}\\.${octet}\\.${octet}\\.${octet}$`);

export function parseIPv4(text: string): number | undefined {
  if (!ipv4Pattern.test(text)) return undefined;
  return text.split('.').reduce((acc, part) => acc * 256 + Number(part), 0);
}

export function formatIPv4(value: number): string {
  return [24, 16, 8, 0].map((shift) => Math.floor(value / 2 ** shift) % 256).join('.');
}

/** Parses "a.b.c.d/n"; refuses host bits set (10.0.0.1/24), which is always a typo here. */
export function parseCidr(text: string): Cidr | undefined {
  const match = /^([^/]+)\/(\d{1,2})$/.exec(text);
  if (!match) return undefined;
  const address = parseIPv4(match[1] ?? '');
  const prefix = Number(match[2]);
  if (address === undefined || prefix > 32) return undefined;
  const size = 2 ** (32 - prefix);
  if (address % size !== 0) return undefined;
  return { text: `${formatIPv4(address)}/${prefix}`, network: address, prefix };
}

export function cidrSize(cidr: Cidr): number {
  return 2 ** (32 - cidr.prefix);
}

export function cidrContains(cidr: Cidr, address: number): boolean {
  return address >= cidr.network && address < cidr.network + cidrSize(cidr);
}

export function cidrsOverlap(a: Cidr, b: Cidr): boolean {
  return cidrContains(a, b.network) || cidrContains(b, a.network);
}

/** A usable host address: inside the range, neither its network nor its broadcast address. */
export function isHostAddress(cidr: Cidr, address: number): boolean {
  if (!cidrContains(cidr, address)) return false;
  if (cidr.prefix >= 31) return true;
  return address !== cidr.network && address !== cidr.network + cidrSize(cidr) - 1;
}
