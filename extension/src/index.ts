/**
 * The "New Quantization Notebook" command, in the command palette and on the launcher.
 * (The report renderer is the rendermime extension in mime.ts.)
 */

import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { ILauncher } from '@jupyterlab/launcher';

import { workbenchIcon } from './icon';
import { starterNotebook } from './notebook';

export const NEW_NOTEBOOK_COMMAND = 'quantization-workbench:new-notebook';
const LABEL = 'New Quantization Notebook';

/** Create a notebook with the starter cells in ``cwd`` and open it; returns its path. */
async function createNotebook(app: JupyterFrontEnd, cwd: string): Promise<string> {
  const contents = app.serviceManager.contents;
  const created = await contents.newUntitled({ path: cwd, type: 'notebook' });
  await contents.save(created.path, {
    type: 'notebook',
    format: 'json',
    content: starterNotebook()
  });
  await app.commands.execute('docmanager:open', { path: created.path, factory: 'Notebook' });
  return created.path;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'quantization-workbench:launcher',
  description: 'Creates a notebook that quantizes a demo model and shows the report.',
  autoStart: true,
  optional: [ICommandPalette, ILauncher, IDefaultFileBrowser],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    launcher: ILauncher | null,
    browser: IDefaultFileBrowser | null
  ) => {
    app.commands.addCommand(NEW_NOTEBOOK_COMMAND, {
      label: LABEL,
      caption: 'Create a notebook that trains a demo model, quantizes it and shows the report',
      icon: workbenchIcon,
      // The launcher passes its folder as cwd; from the palette, use the file browser's.
      execute: args =>
        createNotebook(
          app,
          typeof args.cwd === 'string' ? args.cwd : (browser?.model.path ?? '')
        )
    });
    palette?.addItem({ command: NEW_NOTEBOOK_COMMAND, category: 'Quantization Workbench' });
    // Not in the "Notebook" category: its cards show a kernel's logo (or the label's first
    // letter when there is none), never the command's icon.
    launcher?.add({ command: NEW_NOTEBOOK_COMMAND, category: 'Other', rank: 10 });
  }
};

export default plugin;
