// Pins butane, the one binary upstream publishes without a checksum file.
import { artifactSources, type ComponentVersions } from './components.ts';
import { downloadToCacheHashed, type Pinned, type Session } from './session.ts';

/** butane: upstream publishes no checksum file, so its sha256 is computed from the download (and the lock says so). */
export async function pinButane(s: Session, components: ComponentVersions): Promise<Pinned> {
  const source = artifactSources(s.config.fcos.arch, 'v0.0.0', components).find((src) => src.key === 'butane')!;
  const { sha256 } = await downloadToCacheHashed(s, 'butane', source.url);
  return {
    artifacts: [{ key: 'butane', url: source.url, sha256 }],
    notes: { butane: 'no upstream checksum file (only a detached .asc signature, not checked here):\nsha256 computed by pin from the downloaded bytes' },
  };
}
