/**
 * DispynbPanel: the left-sidebar widget.
 *
 * It follows the current notebook (one KernelLink per notebook) and shows that
 * kernel's clusters (progress, counts, nodes), the nodes found by discovery, and
 * the actions Cancel, Discover and Insert connect code. The DOM is updated in
 * place (per cluster id), so buttons are not replaced under the pointer by the
 * kernel's periodic pushes; all text goes through textContent.
 */

import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { connectCode, nodeSpec } from './connect';
import { KernelLink } from './link';
import { ICluster, ICounts, IDiscovered, INode } from './protocol';

/** The outcomes as the cell's progress line names them (dispynb/jupyter/display.py's
 * format_counts), in its order: done is finished; failed, the jobs that raised,
 * crashed or were given up (a run's cancelled jobs come as cancelled: labcomm.py). */
const OUTCOMES: [string, (c: ICounts) => number][] = [
  ['done', c => c.finished],
  ['failed', c => c.terminated + c.abandoned],
  ['cancelled', c => c.cancelled],
  ['running', c => c.running],
  ['queued', c => c.pending]
];

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

/** As dispynb.jupyter.display.format_bytes: '3.2 GB'. */
function formatBytes(n: number): string {
  const units = ['B', 'KB', 'MB', 'GB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

/** CPU used (the node reports the percentage available) and memory free. A node
 * reports its load when it connects and with each pulse: none means it does not
 * report it (a figure it cannot read now, or an engine that reports none), not
 * that it will. */
function load(node: INode): string {
  if (!node.avail) {
    return 'load unknown';
  }
  const used = Math.min(Math.max(100 - node.avail.cpu, 0), 100);
  return `${used.toFixed(0)}% CPU used · ${formatBytes(node.avail.memory)} free`;
}

function cpus(node: INode): string {
  return `${node.cpus} CPU${node.cpus === 1 ? '' : 's'}`;
}

/** Why a lost node is shown (its badge's tooltip). */
const LOST_TITLE =
  'This node left while its cluster ran: it died, was stopped or was cut off. ' +
  'Its jobs run again on another node (reentrant) or end as the cell says. ' +
  'Shown with its last figures for 30 s.';

/** A node in two lines: name and address (and a "lost" badge); CPUs, busy and load. */
function nodeView(node: INode): HTMLElement {
  let className = 'dispynb-node';
  if (node.released) {
    className += ' dispynb-node-released';
  }
  if (node.lost) {
    className += ' dispynb-node-lost';
  }
  const view = el('div', className);
  view.dataset.name = node.name;
  view.dataset.released = String(!!node.released);
  view.dataset.lost = String(!!node.lost);
  view.dataset.address = node.id;
  view.dataset.cpus = String(node.cpus);
  view.dataset.busy = String(node.busy);
  const head = el('div', 'dispynb-node-head');
  head.append(
    el('span', 'dispynb-node-name', node.name || '?'),
    el('span', 'dispynb-node-address', node.id)
  );
  if (node.lost) {
    const badge = el('span', 'dispynb-node-badge', 'lost');
    badge.title = LOST_TITLE;
    head.append(badge);
  }
  // jobs_done is dispy's: every job that ended on the node (cancelled and failed
  // too), not what the card and the cell call done (finished).
  view.dataset.ended = String(node.jobs_done);
  const ended = `${node.jobs_done} ended`;
  let text = `${cpus(node)} · ${node.busy} busy · ${ended} · ${load(node)}`;
  if (node.lost) {
    text = `${cpus(node)} · ${ended} · lost: died, stopped or cut off`;
  } else if (node.released) {
    text = `${cpus(node)} · ${ended} · released`;
  }
  view.append(head, el('div', 'dispynb-node-info', text));
  return view;
}

function table(className: string, headers: string[], rows: string[][]): HTMLTableElement {
  const t = el('table', className);
  const head = t.createTHead().insertRow();
  for (const h of headers) {
    head.appendChild(el('th', '', h));
  }
  const body = t.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    for (const cell of row) {
      tr.appendChild(el('td', '', cell));
    }
  }
  return t;
}

/** One cluster's card, updated in place. */
class ClusterView {
  readonly node = el('div', 'dispynb-cluster');

  constructor(
    readonly id: string,
    onCancel: (view: ClusterView) => void
  ) {
    this.node.dataset.clusterId = id;
    const head = el('div', 'dispynb-cluster-head');
    head.append(this._title, this._cancel);
    this._cancel.onclick = () => onCancel(this);
    const bar = el('div', 'dispynb-progress');
    bar.append(this._bar, this._text);
    this.node.append(head, bar, this._counts, this._nodes);
  }

  update(cluster: ICluster): void {
    const c = cluster.counts;
    const ended = c.finished + c.terminated + c.cancelled + c.abandoned;
    const pct = c.total ? (100 * ended) / c.total : 0;
    this._title.textContent = cluster.name + (cluster.closed ? ' (closed)' : '');
    this.node.classList.toggle('dispynb-cluster-closed', cluster.closed);
    this.node.dataset.closed = String(cluster.closed);
    this._bar.style.width = `${pct.toFixed(1)}%`;
    // As the notebook's progress bar says it: done is finished (a run stopped
    // or failing is not '40/40 done'); the bar fills with every job that ended.
    this._text.textContent = `${c.finished}/${c.total} done`;
    this.node.dataset.ended = String(ended);
    this.node.dataset.total = String(c.total);
    this._counts.replaceChildren(
      ...OUTCOMES.map(([word, count]) => [word, count(c)] as const)
        .filter(([, n]) => n > 0)
        .map(([word, n]) => {
          const span = el('span', `dispynb-count dispynb-count-${word}`, `${n} ${word}`);
          span.dataset.status = word;
          span.dataset.count = String(n);
          return span;
        })
    );
    const unfinished = c.pending + c.running;
    // A closed cluster has nothing to cancel: no button at all.
    this._cancel.hidden = cluster.closed;
    this._cancel.disabled = cluster.closed || unfinished === 0 || this.cancelling;
    this._cancel.title = this._cancel.disabled
      ? 'Nothing to cancel: no job is queued or running'
      : "Cancel this cluster's queued and running jobs";
    this.node.dataset.starting = String(!!cluster.starting);
    const empty = cluster.closed
      ? 'closed before any node connected'
      : cluster.starting
        ? 'starting: connecting to its nodes, which run its setup'
        : 'no nodes connected yet';
    this._nodes.replaceChildren(
      ...(cluster.nodes.length
        ? cluster.nodes.map(nodeView)
        : [el('div', 'dispynb-empty', empty)])
    );
  }

  cancelling = false;
  private _title = el('span', 'dispynb-cluster-name');
  private _cancel = el('button', 'jp-mod-styled jp-mod-warn dispynb-cancel', 'Cancel');
  private _bar = el('div', 'dispynb-progress-bar');
  private _text = el('span', 'dispynb-progress-text');
  private _counts = el('div', 'dispynb-counts');
  private _nodes = el('div', 'dispynb-nodes');
}

export class DispynbPanel extends Widget {
  constructor(private readonly _tracker: INotebookTracker) {
    super();
    this.id = 'dispynb-sidebar';
    this.addClass('dispynb-panel');
    this.title.caption = 'dispynb: clusters and nodes of this notebook';

    const header = el('div', 'dispynb-header');
    header.append(el('h2', '', 'dispynb'), this._where, this._session);
    this._retry.onclick = () => this._link?.retry();
    this._status.append(this._statusText, this._retry);

    const discovery = el('div', 'dispynb-section dispynb-discovery');
    this._addresses.placeholder = 'IP addresses (optional)';
    this._addresses.title =
      'Node addresses to ping (IPv4, optionally :UDP-port), separated by spaces; ' +
      'empty: broadcast on the local networks';
    this._addresses.onkeydown = event => {
      if (event.key === 'Enter') {
        void this._discover();
      }
    };
    this._discoverButton.onclick = () => void this._discover();
    const row = el('div', 'dispynb-row');
    row.append(this._addresses, this._discoverButton);
    discovery.append(el('h3', '', 'Nodes on the network'), row, this._discovered);

    this._insertButton.onclick = () => this._insert();
    this._insertButton.title =
      'Insert a cell that connects this notebook to the discovered nodes (or to ' +
      'local nodes if none were discovered)';
    const actions = el('div', 'dispynb-section dispynb-actions');
    actions.append(this._insertButton);

    const clusters = el('div', 'dispynb-section');
    clusters.append(el('h3', '', 'Clusters of this kernel'), this._clusterBox);

    this.node.append(header, this._status, clusters, discovery, actions, this._message);

    _tracker.currentChanged.connect(this._follow, this);
    this._follow();
  }

  dispose(): void {
    for (const link of this._links.values()) {
      link.dispose();
    }
    this._links.clear();
    super.dispose();
  }

  /** Switch to the current notebook's link (created on first use). */
  private _follow(): void {
    const panel = this._tracker.currentWidget;
    this._link?.changed.disconnect(this._render, this);
    this._link = panel ? this._linkFor(panel) : null;
    this._link?.changed.connect(this._render, this);
    this._clusterViews.clear();
    this._clusterBox.replaceChildren();
    this._say('');
    this._render();
  }

  private _linkFor(panel: NotebookPanel): KernelLink {
    let link = this._links.get(panel);
    if (!link) {
      const created = new KernelLink(panel.sessionContext);
      this._links.set(panel, created);
      panel.disposed.connect(() => {
        created.dispose();
        this._links.delete(panel);
      });
      link = created;
    }
    return link;
  }

  private _render(): void {
    const panel = this._tracker.currentWidget;
    const link = this._link;
    this._where.textContent = panel ? panel.context.localPath : '';
    let message = '';
    if (!panel || !link) {
      message = 'Open a notebook to see its clusters.';
    } else if (link.status === 'no-kernel') {
      message = 'This notebook has no kernel: select one to use dispynb.';
    } else if (link.status === 'connecting') {
      message = link.error || 'Connecting to the kernel…';
    } else if (link.status !== 'ready') {
      message = link.error;
    }
    const ready = !!link && link.status === 'ready' && !!link.state;
    this._status.dataset.status = link ? link.status : 'no-notebook';
    this._statusText.textContent = message;
    this._status.hidden = !message;
    this._retry.hidden = !(link && ['missing', 'error'].includes(link.status));
    this._discoverButton.disabled = !ready || !!link?.state?.discovering;
    this._insertButton.disabled = !panel;
    this.node.dataset.ready = String(ready);
    const session = ready ? link!.state!.session : null;
    // Named as the cell that started them says them ('dispynb: ssh nodes ...').
    this._session.textContent =
      session && session.kind
        ? `%dispy uses ${session.kind === 'nodes' ? '' : session.kind + ' '}nodes ` +
          session.nodes.join(', ')
        : '';
    this._session.hidden = !this._session.textContent;
    this._renderClusters(ready ? link!.state!.clusters : []);
    this._renderDiscovered(
      ready ? link!.state!.discovered : [],
      ready && !!link!.state!.searched
    );
    this._discoverButton.textContent = link?.state?.discovering ? 'Discovering…' : 'Discover';
  }

  private _renderClusters(clusters: ICluster[]): void {
    const seen = new Set<string>();
    const order: HTMLElement[] = [];
    for (const cluster of clusters) {
      seen.add(cluster.id);
      let view = this._clusterViews.get(cluster.id);
      if (!view) {
        view = new ClusterView(cluster.id, v => void this._cancel(v));
        this._clusterViews.set(cluster.id, view);
      }
      view.update(cluster);
      order.push(view.node);
    }
    for (const id of [...this._clusterViews.keys()]) {
      if (!seen.has(id)) {
        this._clusterViews.get(id)!.node.remove();
        this._clusterViews.delete(id);
      }
    }
    // Re-append only if the order changed, so nodes stay put under the pointer.
    const current = Array.from(this._clusterBox.children);
    if (current.length !== order.length || order.some((n, i) => current[i] !== n)) {
      this._clusterBox.replaceChildren(...order);
    }
    if (!order.length) {
      this._clusterBox.replaceChildren(
        el('div', 'dispynb-empty', 'No clusters: run %%dispy, Run.map or JobCluster.')
      );
    }
  }

  private _renderDiscovered(nodes: IDiscovered[], searched: boolean): void {
    // After a discovery no node answered: not 'press Discover' again, but what to
    // try (a node bound to 127.0.0.1 answers pings sent there only).
    const empty = searched
      ? "no node answered: type the nodes' addresses above"
      : 'none yet: press Discover';
    this._discovered.replaceChildren(
      nodes.length
        ? table(
            'dispynb-discovered-table',
            ['node', 'address', 'CPUs'],
            nodes.map(n => [n.name || '?', nodeSpec(n), String(n.cpus)])
          )
        : el('div', 'dispynb-empty', empty)
    );
  }

  private async _cancel(view: ClusterView): Promise<void> {
    if (!this._link) {
      return;
    }
    view.cancelling = true;
    try {
      const n = await this._link.request({ action: 'cancel', cluster: view.id });
      this._say(`cancelled ${n} job${n === 1 ? '' : 's'}`);
    } catch (reason) {
      this._say(`Cancel failed: ${(reason as Error).message}`, true);
    } finally {
      view.cancelling = false;
    }
  }

  private async _discover(): Promise<void> {
    if (!this._link) {
      return;
    }
    const addresses = this._addresses.value.split(/[\s,]+/).filter(a => a);
    this._say('discovering…');
    try {
      const found: IDiscovered[] = await this._link.request({ action: 'discover', addresses });
      this._say(`discovery found ${found.length} node${found.length === 1 ? '' : 's'}`);
    } catch (reason) {
      this._say(`Discover failed: ${(reason as Error).message}`, true);
    }
  }

  private _insert(): void {
    const panel = this._tracker.currentWidget;
    if (!panel) {
      return;
    }
    const code = connectCode(this._link?.state?.discovered ?? []);
    const notebook = panel.content;
    NotebookActions.insertBelow(notebook);
    const cell = notebook.activeCell;
    if (cell) {
      cell.model.sharedModel.setSource(code);
    }
    const what = code.includes('%dispy nodes') ? 'the discovered nodes' : 'local nodes';
    this._say(`inserted a cell that connects to ${what}`);
  }

  private _say(text: string, error = false): void {
    this._message.textContent = text;
    this._message.classList.toggle('dispynb-error', error);
  }

  private _link: KernelLink | null = null;
  private _links = new Map<NotebookPanel, KernelLink>();
  private _clusterViews = new Map<string, ClusterView>();
  private _where = el('div', 'dispynb-where');
  private _session = el('div', 'dispynb-session');
  private _status = el('div', 'dispynb-status');
  private _statusText = el('span', 'dispynb-status-text');
  private _retry = el('button', 'jp-mod-styled dispynb-retry', 'Retry');
  private _clusterBox = el('div', 'dispynb-clusters');
  private _addresses = el('input', 'jp-mod-styled dispynb-addresses');
  private _discoverButton = el('button', 'jp-mod-styled jp-mod-accept dispynb-discover', 'Discover');
  private _discovered = el('div', 'dispynb-discovered');
  private _insertButton = el('button', 'jp-mod-styled dispynb-insert', 'Insert connect code');
  private _message = el('div', 'dispynb-message');
}
