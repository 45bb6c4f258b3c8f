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

export interface INodeAvail {
  cpu: number;
  memory: number;
  disk: number;
  swap: number;
}

export interface INode {
  id: string;
  name: string;
  ip_addr: string;
  port: number;
  cpus: number;
  avail_cpus: number;
  busy: number;
  jobs_done: number;
  avail: INodeAvail | null;
  /** The node's cluster closed: the figures are its last ones. */
  released?: boolean;
}

export interface ICluster {
  id: string;
  name: string;
  closed: boolean;
  start_time: number;
  now: number;
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
  /** What `%dispy` currently uses: "local", "nodes" or "" (none, or no magics). */
  kind: string;
  nodes: string[];
}

/** Kernel -> panel: the whole state, pushed when it changes (throttled). */
export interface IStateMsg {
  type: 'state';
  protocol: number;
  version: string;
  clusters: ICluster[];
  discovered: IDiscovered[];
  discovering: boolean;
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
