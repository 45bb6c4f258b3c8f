/** JupyterLab plugin: the dispynb sidebar (clusters, progress and nodes of a notebook's kernel). */

import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { INotebookTracker } from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';

import { DispynbPanel } from './panel';
import { untrackSubshellRequests } from './status';

const ICON = new LabIcon({
  name: 'dispynb:icon',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24">' +
    '<g class="jp-icon3" fill="#616161">' +
    '<circle cx="12" cy="5" r="3"/><circle cx="5" cy="18" r="3"/><circle cx="19" cy="18" r="3"/>' +
    '<path d="M11 7.5h2v3.2l4.6 4.6-1.4 1.4-4.2-4.2-4.2 4.2-1.4-1.4 4.6-4.6z"/></g></svg>'
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'dispynb-labextension:plugin',
  description: 'dispynb sidebar: clusters, progress and nodes of the current notebook',
  autoStart: true,
  requires: [INotebookTracker],
  activate: (app: JupyterFrontEnd, tracker: INotebookTracker) => {
    untrackSubshellRequests();
    const panel = new DispynbPanel(tracker);
    panel.title.icon = ICON;
    app.shell.add(panel, 'left', { rank: 950 });
  }
};

export default plugin;
