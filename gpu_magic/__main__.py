from gpu_magic.cli import main

raise SystemExit(main())
