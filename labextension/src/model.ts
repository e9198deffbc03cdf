/**
 * What the sidebar shows, refreshed by one Poll: every 2 s while the panel is visible or the
 * viewer has jobs holding or waiting for GPUs (the status-bar item shows them), every 10 s
 * otherwise, and not at all while the browser tab is hidden.
 */
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import {
  ApiError,
  FINAL_STATES,
  IJob,
  IJobs,
  IPool,
  IStatus,
  offersEveryone,
  request
} from './api';

export const VISIBLE_INTERVAL_MS = 2000;
export const HIDDEN_INTERVAL_MS = 10000;

export class GpuModel {
  status: IStatus | null = null;
  pool: IPool | null = null;
  jobs: IJob[] = [];
  /** The advice to show instead of the pool and jobs, when something is missing. */
  problem: ApiError | null = null;
  /** Seconds to add to the browser's clock to get the server's. */
  clockOffset = 0;
  loaded = false;

  constructor() {
    this._poll = new Poll({
      factory: () => this._refresh(),
      frequency: { interval: VISIBLE_INTERVAL_MS, backoff: true, max: 30000 },
      standby: () =>
        document.hidden ||
        (!this._visible &&
          !this._asked &&
          !this.myActive.length &&
          Date.now() - this._last < HIDDEN_INTERVAL_MS),
      name: 'gpu-magic:refresh'
    });
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get showAll(): boolean {
    return this._showAll;
  }

  set showAll(value: boolean) {
    if (value !== this._showAll) {
      this._showAll = value;
      void this.refresh();
    }
  }

  /** Whether the panel lists every user's jobs: ticked, and offered to this token. */
  get everyone(): boolean {
    return this._showAll && offersEveryone(this.status);
  }

  /**
   * The kernel of the notebook in front: a notebook that ran `%gpu connect` uses its own
   * gateway, which the panel and the status bar then show.
   */
  set kernelId(value: string | null) {
    if (value !== this._kernelId) {
      this._kernelId = value;
      void this.refresh();
    }
  }

  /** Whether the panel is on screen (it polls faster then). */
  set visible(value: boolean) {
    this._visible = value;
    if (value) {
      void this.refresh();
    }
  }

  /** The listed jobs that hold or wait for GPUs: every user's while "everyone" is ticked. */
  get active(): IJob[] {
    return this.jobs.filter(j => !FINAL_STATES.includes(j.state));
  }

  /** The viewer's own jobs that hold or wait for GPUs, whatever the panel lists. */
  get myActive(): IJob[] {
    if (!this._listedAll) {
      return this.active; // the gateway answered with the token's own jobs only
    }
    const me = this.status?.user;
    return me ? this.active.filter(j => j.user === me) : [];
  }

  /** Look now (a poll in standby would let the request pass). */
  refresh(): Promise<void> {
    this._asked = true;
    return this._poll.refresh();
  }

  async cancel(job: IJob): Promise<void> {
    // (to the gateway the job was listed from, whichever notebook is in front now)
    await request<IJob>(
      this._path(`jobs/${encodeURIComponent(job.id)}`, {}, this._listedFor),
      { method: 'DELETE' }
    );
    await this.refresh();
  }

  /** A route of the server extension, for the gateway of a notebook's kernel. */
  private _path(
    route: string,
    query: Record<string, string> = {},
    kernel: string | null = this._kernelId
  ): string {
    const params = new URLSearchParams(query);
    if (kernel) {
      params.set('kernel', kernel);
    }
    const text = params.toString();
    return text ? `${route}?${text}` : route;
  }

  dispose(): void {
    this._poll.dispose();
  }

  private async _refresh(): Promise<void> {
    this._last = Date.now();
    this._asked = false;
    // one notebook's gateway for the whole look: another in front meanwhile looks again
    const kernel = this._kernelId;
    const stale = () => kernel !== this._kernelId;
    try {
      const status = await request<IStatus>(this._path('status', {}, kernel));
      if (stale()) {
        return;
      }
      this.status = status;
      if (!status.reachable || status.error) {
        // (a gateway that answers but refuses the token lists nothing either)
        this.pool = null;
        this.jobs = [];
        this.problem = new ApiError(
          status.reachable ? 502 : 503,
          status.error || 'unreachable',
          status.message || 'the gateway does not answer'
        );
      } else {
        const [pool, jobs] = await Promise.all([
          request<IPool>(this._path('pool', {}, kernel)),
          request<IJobs>(
            this._path('jobs', this.everyone ? { all: 'true' } : {}, kernel)
          )
        ]);
        if (stale()) {
          return;
        }
        this._listedFor = kernel;
        this.pool = pool;
        this.jobs = jobs.jobs;
        this._listedAll = !!jobs.all;
        this.clockOffset = jobs.now - Date.now() / 1000;
        this.problem = null;
      }
    } catch (err) {
      if (!(err instanceof ApiError)) {
        // Jupyter itself does not answer: say so, and let the poll back off.
        this.problem = new ApiError(0, 'jupyter_unreachable', String(err));
        this._finish();
        throw err;
      }
      if (stale()) {
        return; // (another notebook's gateway is asked now: its look decides)
      }
      this.problem = err;
      // what was listed before is not known to hold any more (the status bar counted a
      // revoked student's jobs on, after the reload had cancelled them); a gateway slow to
      // answer once keeps its list, or the status bar would blink
      if (err.code !== 'gateway_timeout') {
        this.pool = null;
        this.jobs = [];
      }
      if (err.code === 'no_server_extension') {
        // nothing will answer until JupyterLab restarts: let the poll back off
        this._finish();
        throw err;
      }
    }
    this._finish();
  }

  private _finish(): void {
    this.loaded = true;
    this._changed.emit();
  }

  private _poll: Poll;
  private _changed = new Signal<this, void>(this);
  private _showAll = false;
  private _kernelId: string | null = null;
  private _listedFor: string | null = null; // the kernel whose gateway listed the jobs
  private _listedAll = false;
  private _visible = false;
  private _last = 0;
  private _asked = false;
}
