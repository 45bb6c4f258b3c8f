/**
 * The kernel status JupyterLab shows (status bar, toolbar circle) while a cell runs.
 *
 * JupyterLab sets a kernel's status from every `status` message on iopub, whatever
 * request it answers, except those whose request type the page config lists as
 * `untracked_message_types` (Jupyter Server's list: kernel_info, interrupt,
 * shutdown...). A kernel with subshells (ipykernel 7) answers the subshell requests
 * of the control channel (create, delete, list) with busy then idle too, while its
 * main shell may still run a cell, and that list predates them. JupyterLab creates
 * a subshell for each comm target the first time it sees one (the progress widget a
 * long %%dispy cell shows, the panel's comm) and the panel makes its own after a
 * reload: the status bar then read Idle for the rest of the cell's run.
 */

import { PageConfig } from '@jupyterlab/coreutils';

/** Control requests that only manage subshells: never the state of an execution. */
const SUBSHELL_REQUESTS = [
  'create_subshell_request',
  'delete_subshell_request',
  'list_subshell_request'
];

const UNTRACKED = 'untracked_message_types';

/** Let the subshell requests' status messages leave the kernel status as it is. */
export function untrackSubshellRequests(): void {
  let types: unknown = [];
  try {
    types = JSON.parse(PageConfig.getOption(UNTRACKED) || '[]');
  } catch {
    // not JSON: keep the server's value and add nothing (JupyterLab could not read it)
    return;
  }
  if (!Array.isArray(types)) {
    return;
  }
  const missing = SUBSHELL_REQUESTS.filter(type => !types.includes(type));
  if (missing.length > 0) {
    PageConfig.setOption(UNTRACKED, JSON.stringify([...types, ...missing]));
  }
}
