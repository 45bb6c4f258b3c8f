/**
 * Messages between the panel and the kernel's `dispynb.lab` comm target
 * (dispynb/jupyter/labcomm.py). Keep both sides in step: PROTOCOL is checked on open.
 */

export const COMM_TARGET = 'dispynb.lab';
export const PROTOCOL = 1;

/**
 * Run silently (no output, no history, no execution count) to register the comm
 * target; it defines no names in the user's namespace. If dispynb is missing, the
 * reply is an error with ename ModuleNotFoundError, which the panel reports.
 */
export const BOOTSTRAP =
  "__import__('dispynb.jupyter.labcomm', fromlist=['register']).register()";

export interface ICounts {
  pending: number;
  running: number;
  finished: number;
  terminated: number;
  cancelled: number;
  abandoned: number;
  total: number;
}

/**
 * The node's latest load report: percent of CPU available, bytes of memory free.
 * The kernel sends what the panel reads, nothing more (a closed page's pushes are
 * kept by the server): labcomm.py's CLUSTER_FIELDS, NODE_FIELDS and AVAIL_FIELDS
 * list these interfaces' fields, and tests/jupyter/test_labcomm.py checks both.
 */
export interface INodeAvail {
  cpu: number;
  memory: number;
}

export interface INode {
  /** Its address, host:port. */
  id: string;
  name: string;
  cpus: number;
  busy: number;
  jobs_done: number;
  /** Null when the node does not report its load (a figure it cannot read now, an
   * engine whose workers report none). */
  avail: INodeAvail | null;
  /** The node's cluster closed, or the node was lost: the figures are its last ones. */
  released?: boolean;
  /** The node left while its cluster ran (it died, was stopped or cut off); shown
   * for a while with its last figures, then dropped. */
  lost?: boolean;
}

export interface ICluster {
  id: string;
  name: string;
  closed: boolean;
  /** Still being made: connecting to its nodes, which run its setup (no node is
   * listed until they are set up). */
  starting: boolean;
  counts: ICounts;
  nodes: INode[];
}

export interface IDiscovered {
  ip_addr: string;
  port: number;
  name: string;
  cpus: number;
}

export interface ISession {
  /** What started the nodes `%dispy` uses ("local", "ssh", "slurm"), "nodes" for
   * those `%dispy nodes` named, or "" (none, or no magics). */
  kind: string;
  nodes: string[];
}

/** Kernel -> panel: the whole state, pushed when it changes (throttled). */
export interface IStateMsg {
  type: 'state';
  protocol: number;
  /** The kernel's dispynb version (said when the protocols differ). */
  version: string;
  clusters: ICluster[];
  discovered: IDiscovered[];
  discovering: boolean;
  /** A discovery has answered in this kernel (an empty list: none answered). */
  searched: boolean;
  session: ISession;
}

/** Kernel -> panel: the answer to one request. */
export interface IReplyMsg {
  type: 'reply';
  id: number;
  ok: boolean;
  result?: any;
  error?: string;
}

export type KernelMsg = IStateMsg | IReplyMsg;

/** Panel -> kernel. */
export type Request =
  | { action: 'cancel'; cluster: string }
  | { action: 'discover'; addresses: string[]; timeout?: number }
  | { action: 'nodes' }
  | { action: 'connect_code'; addresses: string[] };
