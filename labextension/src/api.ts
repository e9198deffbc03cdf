/**
 * The sidebar's view of the server extension's routes (`{base_url}/gpu-magic/api/...`).
 *
 * Everything goes through ServerConnection.makeRequest: it carries Jupyter's auth and XSRF
 * headers and works behind JupyterHub's proxy, where websockets often do not.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface IStatus {
  reachable: boolean;
  url: string | null;
  source: string | null;
  version?: string;
  backend?: string;
  /** null: not known (the gateway refused the token) */
  simulated?: boolean | null;
  /** who the gateway token is, and whether it may see every user's jobs */
  user?: string;
  admin?: boolean;
  /** whether several users share the gateway (null: a gateway too old to say) */
  shared?: boolean | null;
  error?: string;
  message?: string;
}

export interface IPoolType {
  type: string;
  free: number;
  total: number;
  // free, but held for the first waiting job that cannot start yet: no other job gets them
  held?: number;
  memory_gb: number | null;
  simulated: boolean;
}

export interface IPoolGpu {
  node: string;
  index: number;
  type: string;
  memory_gb: number | null;
  busy: boolean;
  held?: boolean;
  foreign?: boolean;
  simulated: boolean;
}

export interface IPool {
  simulated: boolean;
  backend: string;
  types: IPoolType[];
  nodes: { name: string; gpus: IPoolGpu[] }[];
  queue_length: number;
  running: number;
}

export interface IGrant {
  gpu_type: string;
  count: number;
  node: string;
  option_index: number;
  option?: string;
  memory_gb: number | null;
  simulated: boolean;
}

export interface IJob {
  id: string;
  user: string;
  state: string;
  spec: string;
  grant: IGrant | null;
  created: number;
  started: number | null;
  finished: number | null;
  // a job lost to a gateway crash: when that gateway was last seen running it
  ran_until?: number | null;
  message: string | null;
  meta: { cell_id?: string; notebook?: string };
  notebook_path: string | null;
  queue_position?: number;
  // what keeps a queued job waiting when it is not the jobs ahead of it
  waiting_why?: string;
}

export interface IJobs {
  jobs: IJob[];
  total: number;
  all: boolean;
  now: number;
}

export const FINAL_STATES = [
  'succeeded',
  'failed',
  'cancelled',
  'timed_out',
  'lost',
  'expired'
];

/**
 * Whether to offer "everyone": to an admin token (an instructor) of a gateway that others share.
 * The owner token of a personal gateway is an admin too, with nobody else's jobs to see.
 */
export function offersEveryone(status: IStatus | null): boolean {
  return !!status?.admin && status.shared !== false;
}

/** An answer that is not a 2xx, with the advice the server extension sent. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string
  ) {
    super(message);
  }
}

export const NO_EXTENSION_ADVICE =
  'The gpu_magic server extension does not answer in this Jupyter server. Install gpu-magic ' +
  'in the environment that runs JupyterLab (pip install gpu-magic), check that ' +
  '`jupyter server extension list` shows gpu_magic.serverext enabled, and restart JupyterLab.';

export async function request<T>(
  path: string,
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'gpu-magic', 'api', path);
  // A NetworkError (Jupyter itself is gone) propagates: the poll backs off on it.
  const response = await ServerConnection.makeRequest(url, init, settings);
  let body: any = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    if (response.status === 404 && !(body && body.error)) {
      throw new ApiError(404, 'no_server_extension', NO_EXTENSION_ADVICE);
    }
    throw new ApiError(
      response.status,
      (body && body.error) || 'http_error',
      (body && body.message) ||
        `the server answered ${response.status} ${response.statusText}`
    );
  }
  if (body === null) {
    throw new ApiError(502, 'not_json', NO_EXTENSION_ADVICE);
  }
  return body as T;
}
