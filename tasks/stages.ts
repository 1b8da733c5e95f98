// The one list of stages, in dependency order. The CLI, `make <task>` and the graph
// all come from here: adding a stage is one file and one line.
import { bootStage } from './boot.ts';
import { diskStage } from './disk.ts';
import { fetchStage } from './fetch.ts';
import type { Target } from './lib/inputs/config.ts';
import { ignitionStage } from './ignition.ts';
import { imagesStage } from './images.ts';
import { openstackBootStage } from './openstack.ts';
import { pinStage } from './pin/stage.ts';
import { pkiStage } from './pki.ts';
import type { Stage } from './lib/run/stage.ts';
import { verifyStage } from './verify.ts';

export const stages: readonly Stage[] = [pinStage, fetchStage, imagesStage, pkiStage, diskStage, ignitionStage, bootStage, verifyStage];
/** What `cluster` builds: every stage but pin, which asks upstream and runs only when named (or when there is no lock yet). */
export const buildStages: readonly Stage[] = stages.filter((s) => s !== pinStage);

/** The stages of a target: for openstack, boot creates (or rebuilds) servers on the cloud instead of QEMU VMs. */
export function stagesFor(target: Target): readonly Stage[] {
  return target === 'openstack' ? stages.map((s) => (s === bootStage ? openstackBootStage : s)) : stages;
}
