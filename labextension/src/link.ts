/**
 * KernelLink: the panel's connection to one notebook's kernel.
 *
 * It bootstraps the kernel side silently, opens the `dispynb.lab` comm, keeps the
 * latest state the kernel pushes, and re-does all of it after a kernel restart or
 * switch. `changed` fires whenever the status or the state changes.
 */

import { ISessionContext } from '@jupyterlab/apputils';
import { CommsOverSubshells, Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import {
  BOOTSTRAP,
  COMM_TARGET,
  IStateMsg,
  KernelMsg,
  PROTOCOL,
  Request
} from './protocol';

export type LinkStatus =
  | 'no-kernel' // no kernel (none chosen, or shut down)
  | 'connecting' // bootstrapping / opening the comm
  | 'ready' // comm open, state received
  | 'not-python' // the kernel is not an IPython kernel
  | 'missing' // dispynb is not installed in the kernel's environment
  | 'error'; // anything else (message in `error`)

const REQUEST_TIMEOUT_MS = 30_000;

/**
 * After this long without kernel_info from the kernel, say why it may be waiting,
 * and connect beside the running cell if the kernel has subshells.
 */
const BUSY_HINT_MS = 3_000;
export const BUSY_KERNEL =
  'Waiting for the kernel: a running cell holds it; the panel connects when the ' +
  'cell ends (the run goes on meanwhile).';
export const BUSY_KERNEL_BESIDE =
  'A running cell holds the kernel: connecting beside it (a kernel subshell)…';

/** How long a control request (answered by the kernel's control thread) may take. */
const CONTROL_TIMEOUT_MS = 10_000;

interface IPending {
  resolve: (value: any) => void;
  reject: (reason: Error) => void;
  timer: number;
}

/**
 * Wait until the comm's kernel subshell is up, when JupyterLab sends comms over
 * subshells (4.4+, with ipykernel 7+): then the comm opens on it, and the kernel
 * answers the panel (Cancel) even while a cell runs. Otherwise, or after 5 s, go on
 * with the main shell.
 */
async function subshellReady(kernel: Kernel.IKernelConnection, comm: Kernel.IComm): Promise<void> {
  const started: Promise<void> | undefined = (comm as any).subshellStarted;
  const supported = !!(kernel as any).supportsSubshells;
  if (!started || !supported || comm.commsOverSubshells === CommsOverSubshells.Disabled) {
    return;
  }
  let timer = 0;
  await Promise.race([
    started.catch(() => undefined),
    new Promise<void>(resolve => (timer = window.setTimeout(resolve, 5000)))
  ]);
  window.clearTimeout(timer);
}

/**
 * Send a control-channel request and resolve with its reply's content. ipykernel
 * answers the control channel on a thread of its own, even while a cell holds the
 * main shell (where kernel_info waits until the cell ends).
 */
function controlRequest(
  kernel: Kernel.IKernelConnection,
  msgType: string,
  content: object
): Promise<any> {
  const msg = KernelMessage.createMessage({
    msgType: msgType as any,
    channel: 'control',
    session: kernel.clientId,
    username: kernel.username,
    content: content as any
  });
  const future = kernel.sendControlMessage(msg as any, true, true);
  return new Promise((resolve, reject) => {
    const timer = window.setTimeout(() => {
      future.dispose();
      reject(new Error(`the kernel did not answer ${msgType}`));
    }, CONTROL_TIMEOUT_MS);
    future.onReply = reply => {
      window.clearTimeout(timer);
      resolve(reply.content);
    };
  });
}

/**
 * JupyterLab shows the status the kernel last sent from any subshell: once the
 * panel's subshell has answered, it would read Idle while the main shell still runs
 * the cell. Until JupyterLab's kernel_info (queued behind that cell) is answered,
 * show busy again after such an idle; then idle (a cell that runs next says busy).
 */
function keepBusyUntilInfo(
  kernel: Kernel.IKernelConnection,
  current: () => boolean
): void {
  const update = (kernel as any)._updateStatus; // no public way to set it
  if (typeof update !== 'function') {
    return;
  }
  let waiting = true;
  let forced = false;
  const onStatus = (_: unknown, status: Kernel.Status): void => {
    if (waiting && current() && status === 'idle') {
      forced = true;
      update.call(kernel, 'busy');
    }
  };
  kernel.statusChanged.connect(onStatus);
  const done = (): void => {
    waiting = false;
    kernel.statusChanged.disconnect(onStatus);
    if (forced && current() && kernel.status === 'busy') {
      update.call(kernel, 'idle');
    }
  };
  kernel.info.then(done, done);
}

/**
 * The subshells this browser tab created in a kernel, kept in sessionStorage (it
 * outlives a reload): deleting one as the page goes (pagehide) may not reach the
 * kernel, so the tab's next page deletes what is left.
 */
const STALE_KEY = 'dispynb-subshells:';

function rememberSubshell(kernelId: string, subshellId: string): void {
  try {
    const key = STALE_KEY + kernelId;
    const ids: string[] = JSON.parse(window.sessionStorage.getItem(key) ?? '[]');
    window.sessionStorage.setItem(key, JSON.stringify([...ids, subshellId]));
  } catch {
    // no storage (private mode, quota): the pagehide deletion stays
  }
}

function deleteStaleSubshells(kernel: Kernel.IKernelConnection): void {
  const key = STALE_KEY + kernel.id;
  let ids: string[] = [];
  try {
    ids = JSON.parse(window.sessionStorage.getItem(key) ?? '[]');
    window.sessionStorage.removeItem(key);
  } catch {
    return;
  }
  for (const id of ids) {
    void controlRequest(kernel, 'delete_subshell_request', { subshell_id: id }).catch(
      () => undefined // gone already (deleted, or the kernel restarted)
    );
  }
}

/** Stop a connection opened on a subshell, and delete the subshell if still there. */
function closeBeside(side: Kernel.IKernelConnection, kernelAlive: boolean): void {
  if (side.isDisposed) {
    return;
  }
  if (!kernelAlive) {
    side.subshellId = null; // gone with the kernel: nothing to delete, no reply
  }
  try {
    side.dispose(); // deletes its subshell first (waiting for the reply)
  } catch {
    side.subshellId = null;
    side.dispose();
  }
  window.setTimeout(() => {
    if (!side.isDisposed) {
      side.subshellId = null; // no reply: close the websocket anyway
      side.dispose();
    }
  }, CONTROL_TIMEOUT_MS);
}

export class KernelLink {
  constructor(readonly sessionContext: ISessionContext) {
    sessionContext.kernelChanged.connect(this._onKernelChanged, this);
    sessionContext.statusChanged.connect(this._onStatus, this);
    void sessionContext.ready.then(() => this._connect());
    // A page closed or reloaded: the kernel keeps a subshell until told to delete
    // it (a thread each), so delete ours while the connection is still open.
    window.addEventListener('pagehide', this._onPageHide);
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get status(): LinkStatus {
    return this._status;
  }

  get error(): string {
    return this._error;
  }

  get state(): IStateMsg | null {
    return this._state;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  /** Send a request; resolves with the kernel's result, rejects with its error. */
  request(req: Request): Promise<any> {
    const comm = this._comm;
    if (!comm || this._status !== 'ready') {
      return Promise.reject(new Error('not connected to the kernel'));
    }
    const id = ++this._lastId;
    return new Promise((resolve, reject) => {
      const timer = window.setTimeout(() => {
        this._pending.delete(id);
        reject(new Error('the kernel did not answer (is it busy?)'));
      }, REQUEST_TIMEOUT_MS);
      this._pending.set(id, { resolve, reject, timer });
      comm.send({ type: 'request', id, ...req } as any);
    });
  }

  /** Try again (e.g. after installing dispynb in the kernel's environment). */
  retry(): void {
    void this._connect();
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    window.removeEventListener('pagehide', this._onPageHide);
    this._drop();
    Signal.clearData(this);
  }

  private _onPageHide = (): void => {
    const side = this._beside;
    this._beside = null;
    if (side && !side.isDisposed) {
      try {
        side.dispose(); // sends delete_subshell_request first
      } catch {
        // the kernel connection may already be gone
      }
    }
  };

  private _onKernelChanged(): void {
    this._drop();
    void this._connect();
  }

  private _onStatus(_: ISessionContext, status: Kernel.Status): void {
    if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
      // The kernel-side comm and target are gone; connect again once it is back.
      this._drop(false);
      this._needsConnect = true;
      if (status === 'dead') {
        this._setStatus('error', 'The kernel died: restart it to see its clusters.');
      } else {
        this._setStatus('connecting');
      }
    } else if (status === 'idle' && this._needsConnect) {
      void this._connect();
    }
  }

  /** Forget the comm and the state (kernel gone, restarted or switched). */
  private _drop(kernelAlive = true): void {
    this._generation++;
    const comm = this._comm;
    this._comm = null;
    this._state = null;
    const side = this._beside;
    this._beside = null;
    this._claimed = false;
    if (comm && !comm.isDisposed) {
      try {
        comm.close();
      } catch {
        // the kernel connection may already be gone
      }
    }
    for (const pending of this._pending.values()) {
      window.clearTimeout(pending.timer);
      pending.reject(new Error('the kernel connection was reset'));
    }
    this._pending.clear();
    if (side) {
      closeBeside(side, kernelAlive);
    }
  }

  private async _connect(): Promise<void> {
    this._needsConnect = false;
    if (this._disposed) {
      return;
    }
    this._drop();
    const generation = this._generation;
    const kernel = this.sessionContext.session?.kernel ?? null;
    if (!kernel) {
      this._setStatus('no-kernel');
      return;
    }
    this._setStatus('connecting');
    deleteStaleSubshells(kernel);
    // A page opened while a cell runs (a long %%dispy): the kernel answers on its
    // main shell (kernel_info, the bootstrap) only when the cell ends, and JupyterLab
    // learns of its subshells from kernel_info. Ask on the control channel instead,
    // and connect on a subshell of our own; else say why the panel waits.
    let beside: Promise<boolean> | null = null;
    const slow = window.setTimeout(() => {
      if (generation === this._generation && this._status === 'connecting') {
        beside = this._connectBeside(kernel, generation);
      }
    }, BUSY_HINT_MS);
    // The timer runs on through the bootstrap: it may wait behind cells that
    // started after kernel_info (Run All). Whichever path gets there first opens
    // the comm (`_claimed`).
    try {
      const info = await kernel.info;
      if (generation !== this._generation) {
        return;
      }
      if (beside !== null && (await beside)) {
        return; // connected on a subshell meanwhile (or said why not)
      }
      if (generation !== this._generation) {
        return;
      }
      await this._open(kernel, info.language_info.name, generation);
    } catch (reason) {
      if (generation === this._generation) {
        this._setStatus('error', String(reason));
      }
    } finally {
      window.clearTimeout(slow);
    }
  }

  /**
   * Connect while the main shell is busy: kernel_info on the control channel, then
   * (if the kernel has subshells) a subshell and a connection of our own on it,
   * which bootstraps and opens the comm there. Resolves true once the link is
   * ready or has said what is wrong, false to let the main shell's path go on.
   */
  private async _connectBeside(
    kernel: Kernel.IKernelConnection,
    generation: number
  ): Promise<boolean> {
    this._setStatus('connecting', BUSY_KERNEL);
    const busy = () => generation === this._generation && !this._claimed;
    try {
      const info = await controlRequest(kernel, 'kernel_info_request', {});
      const features: string[] = info.supported_features ?? [];
      if (!busy() || !features.includes('kernel subshells')) {
        return false;
      }
      this._setStatus('connecting', BUSY_KERNEL_BESIDE);
      keepBusyUntilInfo(kernel, () => generation === this._generation);
      const created = await controlRequest(kernel, 'create_subshell_request', {});
      if (!busy() || created.status !== 'ok') {
        if (created.status === 'ok') {
          void controlRequest(kernel, 'delete_subshell_request', {
            subshell_id: created.subshell_id
          }).catch(() => undefined);
        }
        return false;
      }
      // Every message of this connection (kernel_info, execute, comm) carries the
      // subshell's id: its thread answers while the main shell runs the cell.
      const side = kernel.clone({
        handleComms: true,
        subshellId: created.subshell_id
      } as any);
      this._beside = side;
      rememberSubshell(kernel.id, created.subshell_id);
      const sideInfo = await side.info;
      if (!busy()) {
        return this._leaveBeside(side);
      }
      if (await this._open(side, sideInfo.language_info.name, generation)) {
        return true;
      }
      return this._leaveBeside(side);
    } catch {
      if (busy()) {
        this._setStatus('connecting', BUSY_KERNEL);
      }
      return false;
    }
  }

  /** The main shell's path opened the comm first: close the subshell's link. */
  private _leaveBeside(side: Kernel.IKernelConnection): false {
    if (this._beside === side) {
      this._beside = null;
      closeBeside(side, true);
    }
    return false;
  }

  /**
   * Bootstrap the kernel side over ``kernel`` and open the comm on it. Resolves
   * false if the other path (main shell, subshell) got there first.
   */
  private async _open(
    kernel: Kernel.IKernelConnection,
    language: string,
    generation: number
  ): Promise<boolean> {
    if (language !== 'python') {
      this._claimed = true;
      this._setStatus(
        'not-python',
        `this kernel runs ${language}; dispynb needs a Python kernel`
      );
      return true;
    }
    const future = kernel.requestExecute({
      code: BOOTSTRAP,
      silent: true,
      store_history: false
    });
    const reply = (await future.done) as KernelMessage.IExecuteReplyMsg;
    if (generation !== this._generation || this._claimed) {
      return false;
    }
    this._claimed = true;
    const content = reply.content;
    if (content.status === 'error') {
      if (content.ename === 'ModuleNotFoundError' || content.ename === 'ImportError') {
        this._setStatus(
          'missing',
          `dispynb is not installed in this kernel's environment (${content.evalue}). ` +
            "Install it there (pip install 'dispynb[jupyter]'), restart the kernel, " +
            'then press Retry.'
        );
      } else {
        this._setStatus('error', `${content.ename}: ${content.evalue}`);
      }
      return true;
    }
    if (content.status !== 'ok') {
      this._setStatus('error', `the kernel answered ${content.status}`);
      return true;
    }
    const comm = kernel.createComm(COMM_TARGET);
    await subshellReady(kernel, comm);
    if (generation !== this._generation) {
      comm.dispose();
      return true;
    }
    this._comm = comm;
    comm.onMsg = msg => {
      if (generation === this._generation) {
        this._onMessage(msg.content.data as unknown as KernelMsg);
      }
    };
    comm.onClose = () => {
      if (generation === this._generation) {
        this._comm = null;
        this._state = null;
        this._setStatus('error', 'the kernel closed the connection; press Retry');
      }
    };
    await comm.open({ protocol: PROTOCOL }).done;
    return true;
  }

  private _onMessage(msg: KernelMsg): void {
    if (msg.type === 'state') {
      if (msg.protocol !== PROTOCOL) {
        this._setStatus(
          'error',
          `the kernel's dispynb ${msg.version} speaks panel protocol ` +
            `${msg.protocol}, this panel ` +
            `${PROTOCOL}: install the same dispynb in the kernel and in JupyterLab`
        );
        return;
      }
      this._state = msg;
      this._setStatus('ready');
      this._changed.emit();
    } else if (msg.type === 'reply') {
      const pending = this._pending.get(msg.id);
      if (!pending) {
        return;
      }
      this._pending.delete(msg.id);
      window.clearTimeout(pending.timer);
      if (msg.ok) {
        pending.resolve(msg.result);
      } else {
        pending.reject(new Error(msg.error ?? 'request failed'));
      }
    }
  }

  private _setStatus(status: LinkStatus, error = ''): void {
    if (status === this._status && error === this._error) {
      return;
    }
    this._status = status;
    this._error = error;
    this._changed.emit();
  }

  private _changed = new Signal<this, void>(this);
  private _status: LinkStatus = 'connecting';
  private _error = '';
  private _state: IStateMsg | null = null;
  private _comm: Kernel.IComm | null = null;
  private _beside: Kernel.IKernelConnection | null = null; // on a subshell of ours
  private _claimed = false; // a path (main shell or subshell) opens the comm
  private _generation = 0;
  private _needsConnect = false;
  private _lastId = 0;
  private _pending = new Map<number, IPending>();
  private _disposed = false;
}
