/** The code cell "Insert connect code" puts into the notebook. */

import { IDiscovered } from './protocol';

/** `host:port` as `%dispy nodes` takes it (IPv6 hosts in brackets). */
export function nodeSpec(node: IDiscovered): string {
  const host = node.ip_addr.includes(':') ? `[${node.ip_addr}]` : node.ip_addr;
  return `${host}:${node.port}`;
}

/**
 * Code that loads the magics and chooses nodes: the discovered ones if any (they
 * need the nodes' shared secret), else local node servers on this machine.
 */
export function connectCode(discovered: IDiscovered[]): string {
  if (discovered.length === 0) {
    return ['%load_ext dispynb', '%dispy local'].join('\n');
  }
  return [
    '%load_ext dispynb',
    "# the nodes' shared secret: set DISPYNB_SECRET or DISPYNB_SECRET_FILE in the",
    "# kernel's environment, or add --secret-file FILE below",
    `%dispy nodes ${discovered.map(nodeSpec).join(' ')}`
  ].join('\n');
}
