/**
 * gpu_magic's JupyterLab side: a left-sidebar panel with the GPU pool and the user's %%gpu
 * jobs, and a small status-bar item while jobs hold or wait for GPUs.
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

import { IJob } from './api';
import { gpuIcon } from './icon';
import { GpuModel } from './model';
import { GpuPanel } from './panel';

export const PANEL_ID = 'gpu-magic-sidebar';
/** The source of a cell that may start a GPU job. */
const GPU_CELL = /%%gpu|gpu_magic|@gpu\b/;

/** Bring the notebook a job came from to the front and scroll to the job's cell. */
async function showCell(
  app: JupyterFrontEnd,
  tracker: INotebookTracker | null,
  job: IJob
): Promise<void> {
  const path = job.notebook_path;
  const cellId = job.meta?.cell_id;
  if (!path || !cellId) {
    return;
  }
  let panel: NotebookPanel | null | undefined = tracker?.find(
    p => p.context.path === path
  );
  if (!panel) {
    const opened = await app.commands.execute('docmanager:open', { path });
    panel = opened instanceof NotebookPanel ? opened : null;
  }
  if (!panel) {
    return;
  }
  app.shell.activateById(panel.id);
  await panel.context.ready;
  await panel.revealed;
  const notebook = panel.content;
  const index = notebook.widgets.findIndex(c => c.model.id === cellId);
  if (index < 0) {
    return; // the cell was deleted since
  }
  notebook.activeCellIndex = index;
  await notebook.scrollToCell(notebook.widgets[index], 'center');
}

/**
 * "GPU: H100 ×2 running", "GPU: 1 queued (simulated)": the viewer's own jobs only (an admin's
 * panel may list everyone's); shown only while there is something to say.
 */
class GpuStatusItem extends Widget {
  constructor(
    private _model: GpuModel,
    onClick: () => void
  ) {
    super();
    this.addClass('jp-GpuMagic-status');
    this.node.title = 'gpu_magic jobs: click to show the GPU sidebar';
    this.node.addEventListener('click', onClick);
    _model.changed.connect(this._update, this);
  }

  private _update(): void {
    const active = this._model.myActive;
    const running = active.filter(j => j.grant && j.state === 'running');
    const queued = active.filter(j => j.state === 'queued').length;
    const parts: string[] = [];
    if (running.length === 1 && running[0].grant) {
      const g = running[0].grant;
      parts.push(`${g.gpu_type} ×${g.count} running`);
    } else if (running.length > 1) {
      parts.push(`${running.length} jobs running`);
    }
    if (queued) {
      parts.push(`${queued} queued`);
    }
    // every display of a simulated pool says so
    const simulated =
      !!this._model.status?.simulated || running.some(j => j.grant?.simulated);
    this.node.textContent = parts.length
      ? `GPU: ${parts.join(', ')}${simulated ? ' (simulated)' : ''}`
      : '';
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'gpu-magic-labextension:sidebar',
  description: 'The GPU pool and your %%gpu jobs, in the left sidebar.',
  autoStart: true,
  // JupyterLab's shell is not required: Notebook 7 (a JupyterHub's default page) has a left
  // area too, and a required ILabShell failed the whole plugin there
  optional: [ILabShell, ILayoutRestorer, INotebookTracker, IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    restorer: ILayoutRestorer | null,
    tracker: INotebookTracker | null,
    statusBar: IStatusBar | null
  ) => {
    const shell = app.shell;
    const model = new GpuModel();
    const panel = new GpuPanel({
      model,
      showCell: job => {
        showCell(app, tracker, job).catch(err =>
          console.warn('gpu_magic: cannot show the cell of job', job.id, err)
        );
      }
    });
    panel.id = PANEL_ID;
    panel.title.icon = gpuIcon;
    panel.title.caption = 'GPU pool and jobs (gpu_magic)';
    if (!labShell) {
      // Notebook 7 names side panels by their label (View > Left Sidebar); Lab shows the icon
      panel.title.label = 'GPU pool and jobs';
    }
    shell.add(panel, 'left', { rank: 650 });
    if (restorer) {
      restorer.add(panel, PANEL_ID);
    }
    // a cell that may start a GPU job: look when the kernel starts it (not when it is
    // queued: behind a busy cell the look came before the job), not at the next poll (up to
    // 10 s away while the panel is closed, and the status-bar item lagged that much). Once a
    // notebook has used gpu_magic any of its cells may: `train()` of a function decorated
    // with @gpu in an earlier cell names no magic of its own.
    const watch = (nb: NotebookPanel) => {
      let usesGpu = false;
      nb.sessionContext.iopubMessage.connect((_, msg) => {
        if (msg.header.msg_type !== 'execute_input') {
          return;
        }
        const code = (msg.content as { code?: unknown }).code;
        usesGpu = usesGpu || GPU_CELL.test(String(code ?? ''));
        if (usesGpu) {
          for (const ms of [300, 1500]) {
            window.setTimeout(() => void model.refresh(), ms);
          }
        }
      });
    };
    tracker?.forEach(watch);
    tracker?.widgetAdded.connect((_, nb) => watch(nb));
    // the notebook in front, and its kernel: one that ran `%gpu connect` shows its own gateway
    const follow = () => {
      const nb = tracker?.currentWidget;
      model.kernelId = nb?.sessionContext.session?.kernel?.id ?? null;
    };
    tracker?.currentChanged.connect((_, nb) => {
      follow();
      nb?.sessionContext.kernelChanged.connect(follow);
      nb?.sessionContext.ready.then(follow, () => undefined);
    });
    follow();
    if (statusBar) {
      const item = new GpuStatusItem(model, () => shell.activateById(PANEL_ID));
      statusBar.registerStatusItem('gpu-magic-labextension:status', {
        item,
        align: 'left',
        rank: 5,
        isActive: () => model.myActive.length > 0,
        activeStateChanged: model.changed
      });
    }
  }
};

export default plugin;
