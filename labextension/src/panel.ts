/**
 * The sidebar panel: the connection line, the pool per GPU type, and the jobs.
 *
 * It re-renders only when what it shows changed (elapsed times are updated in place), so a
 * button is never replaced under a pointer between mousedown and mouseup.
 */
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import {
  ApiError,
  FINAL_STATES,
  IGrant,
  IJob,
  IPool,
  IStatus,
  offersEveryone
} from './api';
import { GpuModel } from './model';

type Attrs = { [key: string]: string | boolean | undefined };

/** A small element builder: h('div', {class: 'x'}, 'text', child). */
function h(
  tag: string,
  attrs: Attrs = {},
  ...children: (Node | string | null | undefined | false)[]
): HTMLElement {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) {
      continue;
    }
    el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) {
    if (c !== null && c !== undefined && c !== false) {
      el.append(c);
    }
  }
  return el;
}

export function formatSeconds(s: number): string {
  s = Math.max(0, s);
  if (s < 10) {
    return `${s.toFixed(1)} s`;
  }
  if (s < 90) {
    return `${Math.round(s)} s`;
  }
  if (s < 5400) {
    return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  }
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

/** "H100 ×2 on node-0" and " · option 1 of 3" (nothing for a spec of one option) */
export function grantText(grant: IGrant, spec: string): [string, string] {
  const n = spec.split(',').length;
  const where = `${grant.gpu_type} ×${grant.count} on ${grant.node}`;
  return [where, n > 1 ? ` · option ${grant.option_index + 1} of ${n}` : ''];
}

/** How long a job has waited, run, or ran; from the server's clock. */
export function elapsedText(job: IJob, now: number): string {
  const finished = job.finished ?? null;
  if (job.started === null || job.started === undefined) {
    // it never ran (still queued, or cancelled or expired in the queue): only its wait counts
    return finished === null
      ? `waiting ${formatSeconds(now - job.created)}`
      : `queued ${formatSeconds(finished - job.created)}`;
  }
  if (job.state === 'queued') {
    return `waiting ${formatSeconds(now - job.created)}`; // queued again after a lost node
  }
  if (finished !== null) {
    return `ran ${formatSeconds((job.ran_until ?? finished) - job.started)}`;
  }
  return `for ${formatSeconds(now - job.started)}`;
}

/**
 * Every display of a simulated pool says so: the connection line, each pool and node row, each
 * grant (and the status bar, in index.ts).
 */
export function simulatedMark(): HTMLElement {
  return h(
    'span',
    {
      class: 'jp-GpuMagic-badge jp-mod-simulated',
      title: 'simulated: no real GPU runs these jobs'
    },
    'simulated'
  );
}

export interface IGpuPanelOptions {
  model: GpuModel;
  /** Show the notebook cell a job came from (opening the notebook if needed). */
  showCell: (job: IJob) => void;
}

export class GpuPanel extends Widget {
  constructor(options: IGpuPanelOptions) {
    super();
    this._model = options.model;
    this._showCell = options.showCell;
    this.addClass('jp-GpuMagic-panel');
    this.node.append(
      h('div', { class: 'jp-GpuMagic-header' }, 'GPU pool'),
      this._body
    );
    this._body.className = 'jp-GpuMagic-body';
    this._model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    this._model.visible = true;
  }

  protected onAfterHide(msg: Message): void {
    this._model.visible = false;
  }

  private _render(): void {
    const m = this._model;
    const key = JSON.stringify([
      m.loaded,
      m.status,
      m.pool,
      m.problem && [m.problem.code, m.problem.message],
      m.showAll,
      [...this._expanded],
      // the jobs without what changes every tick
      m.jobs.map(j => [j.id, j.state, j.grant, j.queue_position, j.waiting_why, j.message])
    ]);
    if (key !== this._key) {
      this._key = key;
      // what has the keyboard's focus is built anew too: give it back to its successor, or
      // a Cancel button could not be reached with Tab while jobs run (each poll rebuilt it)
      const focused = document.activeElement;
      const focusKey =
        focused instanceof HTMLElement && this._body.contains(focused)
          ? focused.dataset.focusKey
          : undefined;
      this._body.replaceChildren(...this._build());
      if (focusKey) {
        this._body
          .querySelector<HTMLElement>(`[data-focus-key="${CSS.escape(focusKey)}"]`)
          ?.focus();
      }
    }
    this._tick();
  }

  /** Update the elapsed times in place. */
  private _tick(): void {
    const now = Date.now() / 1000 + this._model.clockOffset;
    const byId = new Map(this._model.jobs.map(j => [j.id, j]));
    for (const el of Array.from(
      this._body.querySelectorAll<HTMLElement>('[data-elapsed-of]')
    )) {
      const job = byId.get(el.dataset.elapsedOf!);
      if (job) {
        el.textContent = elapsedText(job, now);
      }
    }
  }

  private _build(): Node[] {
    const m = this._model;
    if (!m.loaded) {
      return [h('div', { class: 'jp-GpuMagic-muted' }, 'Asking the gateway…')];
    }
    const out: Node[] = [this._connection(m.status, m.problem)];
    if (m.problem) {
      out.push(this._advice(m.problem));
      return out;
    }
    if (m.pool) {
      out.push(this._pool(m.pool));
    }
    out.push(this._jobs(m.jobs));
    return out;
  }

  private _connection(status: IStatus | null, problem: ApiError | null): Node {
    const ok = !!status?.reachable && !problem;
    // none started yet (or stopped) is the usual first state, not a fault: no red dot
    const none = problem?.code === 'no_gateway';
    const refused = (problem?.code ?? status?.error) === 'gateway_unauthorized';
    const parts: (Node | string)[] = [
      h('span', {
        class: `jp-GpuMagic-dot ${ok ? 'jp-mod-ok' : none ? 'jp-mod-none' : 'jp-mod-bad'}`,
        title: ok
          ? 'reachable'
          : none
            ? 'no gateway running'
            : refused
              ? 'refused the token'
              : 'not reachable'
      })
    ];
    if (status?.url) {
      parts.push(
        h('span', { class: 'jp-GpuMagic-url', title: status.source ?? '' }, status.url)
      );
    } else {
      parts.push(
        h('span', { class: 'jp-GpuMagic-url' }, none ? 'no gateway running' : 'no gateway')
      );
    }
    if (!none) {
      parts.push(
        h(
          'span',
          { class: 'jp-GpuMagic-muted' },
          refused ? ' refused the token' : status?.reachable ? ' reachable' : ' not reachable'
        )
      );
    }
    // what it serves is said only when known: never "real GPUs" of a pool it did not show
    if (status?.reachable && !problem && typeof status.simulated === 'boolean') {
      parts.push(
        status.simulated
          ? simulatedMark()
          : h('span', { class: 'jp-GpuMagic-badge' }, 'real GPUs')
      );
      if (status.version) {
        parts.push(h('span', { class: 'jp-GpuMagic-muted' }, ` v${status.version}`));
      }
    }
    if (status?.source?.startsWith("this notebook's")) {
      // not JupyterLab's own gateway: say why the panel shows this one, and as whom
      const who = status.user ? `, as ${status.user}` : '';
      parts.push(
        h('div', { class: 'jp-GpuMagic-muted jp-GpuMagic-via' }, `${status.source}${who}`)
      );
    }
    return h('div', { class: 'jp-GpuMagic-connection' }, ...parts);
  }

  private _advice(problem: ApiError): Node {
    return h(
      'div',
      { class: 'jp-GpuMagic-advice', 'data-error': problem.code },
      problem.message
    );
  }

  private _pool(pool: IPool): Node {
    const section = h(
      'div',
      { class: 'jp-GpuMagic-section' },
      h(
        'div',
        { class: 'jp-GpuMagic-title' },
        'Pool',
        h(
          'span',
          { class: 'jp-GpuMagic-muted jp-GpuMagic-queue' },
          ` · ${pool.queue_length} queued · ${pool.running} running`
        )
      )
    );
    if (!pool.types.length) {
      section.append(
        h('div', { class: 'jp-GpuMagic-muted' }, 'This gateway has no GPUs.')
      );
    }
    for (const t of pool.types) {
      const open = this._expanded.has(t.type);
      const row = h(
        'div',
        {
          class: 'jp-GpuMagic-type',
          'data-type': t.type,
          'data-focus-key': `type:${t.type}`,
          role: 'button',
          tabindex: '0',
          'aria-expanded': open ? 'true' : 'false',
          title: 'Show the nodes'
        },
        h('span', { class: 'jp-GpuMagic-caret' }, open ? '▾' : '▸'),
        h(
          'span',
          {
            class: 'jp-GpuMagic-typename',
            title: t.memory_gb ? `${t.type}: ${t.memory_gb} GB each` : t.type
          },
          t.type
        ),
        this._bar(t.free, t.total),
        h(
          'span',
          {
            class: 'jp-GpuMagic-free',
            title: t.held
              ? `${t.held} of the free ones held for the first waiting job, which needs more`
              : ''
          },
          `${t.free}/${t.total} free` + (t.held ? ` (${t.held} held)` : '')
        ),
        // on a line of its own under the name: beside the bar it would not fit the sidebar
        t.simulated && h('span', { class: 'jp-GpuMagic-break' }),
        t.simulated && simulatedMark()
      );
      const toggle = () => {
        if (open) {
          this._expanded.delete(t.type);
        } else {
          this._expanded.add(t.type);
        }
        this._render();
      };
      row.addEventListener('click', toggle);
      row.addEventListener('keydown', ev => {
        if (ev.key === 'Enter' || ev.key === ' ') {
          ev.preventDefault();
          toggle();
        }
      });
      section.append(row);
      if (open) {
        section.append(this._nodes(pool, t.type, t.memory_gb));
      }
    }
    return section;
  }

  private _bar(free: number, total: number): Node {
    const used = total ? ((total - free) / total) * 100 : 0;
    const bar = h(
      'span',
      { class: 'jp-GpuMagic-bar', title: `${total - free} of ${total} in use` },
      h('span', { class: 'jp-GpuMagic-bar-used' })
    );
    (bar.firstChild as HTMLElement).style.width = `${used}%`;
    return bar;
  }

  private _nodes(pool: IPool, type: string, memoryGb: number | null): Node {
    const list = h('div', { class: 'jp-GpuMagic-nodes' });
    for (const node of pool.nodes) {
      const gpus = node.gpus.filter(g => g.type === type);
      if (!gpus.length) {
        continue;
      }
      const dots = gpus.map(g =>
        h('span', {
          class: `jp-GpuMagic-gpu ${g.busy ? 'jp-mod-busy' : 'jp-mod-free'}`,
          title:
            `GPU ${g.index}: ` +
            (g.busy ? 'busy' : g.held ? 'free, held for a waiting job' : 'free') +
            (g.foreign ? ' (used by a process outside gpu_magic)' : '') +
            (g.simulated ? ', simulated' : '')
        })
      );
      const free = gpus.filter(g => !g.busy).length;
      list.append(
        h(
          'div',
          { class: 'jp-GpuMagic-node', 'data-node': node.name },
          h('span', { class: 'jp-GpuMagic-nodename' }, node.name),
          ...dots,
          h(
            'span',
            { class: 'jp-GpuMagic-nodeinfo' },
            h(
              'span',
              { class: 'jp-GpuMagic-muted' },
              ` ${free}/${gpus.length} free` + (memoryGb ? ` · ${memoryGb} GB each` : '')
            ),
            gpus.some(g => g.simulated) && simulatedMark()
          )
        )
      );
    }
    return list;
  }

  private _jobs(jobs: IJob[]): Node {
    const m = this._model;
    const all = h('input', { type: 'checkbox', class: 'jp-GpuMagic-all' }) as HTMLInputElement;
    all.checked = m.showAll;
    all.addEventListener('change', () => {
      m.showAll = all.checked;
    });
    // only an admin (instructor) token of a shared gateway has other users' jobs to see
    const offered = offersEveryone(m.status);
    const section = h(
      'div',
      { class: 'jp-GpuMagic-section' },
      h(
        'div',
        { class: 'jp-GpuMagic-title' },
        m.everyone ? 'Jobs' : 'My jobs',
        offered &&
          h(
            'label',
            {
              class: 'jp-GpuMagic-muted jp-GpuMagic-alllabel',
              title: "Your token is an admin's: show every user's jobs"
            },
            all,
            'everyone'
          )
      )
    );
    if (!jobs.length) {
      section.append(
        h(
          'div',
          { class: 'jp-GpuMagic-muted jp-GpuMagic-nojobs' },
          'No jobs yet: run a cell that starts with %%gpu.'
        )
      );
    }
    for (const job of jobs) {
      section.append(this._job(job));
    }
    return section;
  }

  private _job(job: IJob): Node {
    const active = !FINAL_STATES.includes(job.state);
    const row = h('div', {
      class: `jp-GpuMagic-job jp-mod-${job.state}`,
      'data-job-id': job.id,
      'data-state': job.state
    });
    const cancel = active
      ? h(
          'button',
          {
            class: 'jp-GpuMagic-cancel jp-Button',
            title: `Cancel job ${job.id}`,
            'aria-label': `Cancel job ${job.id}`,
            'data-focus-key': `cancel:${job.id}`
          },
          'Cancel'
        )
      : null;
    if (cancel) {
      cancel.addEventListener('click', ev => {
        ev.stopPropagation();
        (cancel as HTMLButtonElement).disabled = true;
        this._model.cancel(job).catch(err => {
          (cancel as HTMLButtonElement).disabled = false;
          cancel.title = String(err.message || err);
        });
      });
    }
    // Cancel floats in the top right corner whatever wraps (in the first line's flow it
    // jumped between that line and one of its own); the lines below it take the row's whole
    // width (beside it, in a column of their own, "sim-vm" broke in two)
    if (cancel) {
      row.append(cancel);
    }
    const main = h('div', { class: 'jp-GpuMagic-jobmain' });
    row.append(main);
    const everyone = this._model.everyone;
    main.append(
      h(
        'div',
        { class: 'jp-GpuMagic-jobline' },
        // whose job comes first in the everyone view: it is what an instructor scans for
        everyone &&
          h('span', { class: 'jp-GpuMagic-user', title: `${job.user}'s job` }, job.user),
        h('span', { class: 'jp-GpuMagic-state' }, job.state.replace('_', ' ')),
        h('span', { class: 'jp-GpuMagic-spec', title: 'the GPU spec asked for' }, job.spec),
        h('span', { class: 'jp-GpuMagic-elapsed', 'data-elapsed-of': job.id })
      )
    );
    if (job.grant) {
      const [where, option] = grantText(job.grant, job.spec);
      main.append(
        h(
          'div',
          { class: 'jp-GpuMagic-grant' },
          // in one piece: below Cancel if it does not fit beside it ("sim-" / "vm")
          h('span', { class: 'jp-GpuMagic-where' }, where),
          option,
          job.grant.simulated ? simulatedMark() : null
        )
      );
    } else if (job.state === 'queued') {
      main.append(
        h(
          'div',
          { class: 'jp-GpuMagic-grant jp-GpuMagic-muted' },
          job.queue_position ? `#${job.queue_position} in the queue` : 'in the queue',
          job.waiting_why ? `: ${job.waiting_why}` : ''
        )
      );
    }
    const where = job.notebook_path || job.meta?.notebook;
    const origin = h(
      'div',
      { class: 'jp-GpuMagic-origin jp-GpuMagic-muted' },
      where ? where.split('/').pop()! : 'no notebook',
      job.meta?.cell_id ? ' · cell' : '',
      ` · ${job.id}`
    );
    main.append(origin);
    if (job.message && !active) {
      main.append(h('div', { class: 'jp-GpuMagic-message' }, job.message));
    }
    if (job.notebook_path && job.meta?.cell_id) {
      row.classList.add('jp-mod-linked');
      row.title = `Show the cell in ${job.notebook_path}`;
      row.addEventListener('click', () => this._showCell(job));
      // for the keyboard, the line naming the cell is the link (not the row: a control
      // inside a control, its Cancel button, is hidden from screen readers)
      origin.setAttribute('role', 'link');
      origin.setAttribute('tabindex', '0');
      origin.setAttribute('aria-label', `Show the cell of job ${job.id} in ${job.notebook_path}`);
      origin.dataset.focusKey = `job:${job.id}`;
      origin.addEventListener('keydown', ev => {
        if (ev.key === 'Enter') {
          ev.preventDefault();
          this._showCell(job);
        }
      });
    }
    return row;
  }

  private _model: GpuModel;
  private _showCell: (job: IJob) => void;
  private _body = document.createElement('div');
  private _key = '';
  private _expanded = new Set<string>();
}
