//! Check of the emulated CUDA driver (emu/driver.cpp) with the test stub
//! (emu/test/stub_runtime.cpp) through cudarc's safe API and the crate's CUDA
//! backend. Not part of the crate's build: see emu/README-driver.md for how to run it
//! (it is copied to examples/ and run with `--features cuda`).
use cudarc::driver::sys;
use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use moe_router::cuda::{bias_update, CudaBackend};

const FAKE_PTX: &str = "//\n.version 8.0\n.target sm_90\n.address_size 64\n\n\
.visible .entry emu_test_fill(\n\t.param .u64 p0,\n\t.param .u32 p1,\n\t.param .f32 p2\n)\n{\n\tret;\n}\n\
.visible .entry emu_test_poke(\n\t.param .u64 p0,\n\t.param .u64 p1\n)\n{\n\tret;\n}\n\
.visible .entry emu_test_fail()\n{\n\tret;\n}\n\
.visible .entry not_emulated()\n{\n\tret;\n}\n";

fn cfg(g: u32, b: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (g, 1, 1),
        block_dim: (b, 1, 1),
        shared_mem_bytes: smem,
    }
}

fn main() {
    assert!(moe_router::cuda::device_available(), "device_available");
    assert_eq!(moe_router::cuda::device_count(), 1);
    let be = CudaBackend::new(0).expect("CudaBackend::new");
    assert_eq!(be.arch(), "sm_90");
    let ctx = be.context().clone();
    assert_eq!(ctx.name().unwrap(), "moe-router CPU emulator");
    assert_eq!(ctx.total_mem().unwrap(), 16 << 30);
    let (free0, total) = ctx.mem_get_info().unwrap();
    assert_eq!(total, 16 << 30);
    assert!(ctx.has_async_alloc());
    let _uuid = ctx.uuid().unwrap();
    println!("context ok: free {free0} of {total}");

    // Memory round trips on the default stream.
    let s = be.stream().clone();
    {
        let z = s.alloc_zeros::<f32>(10).unwrap();
        assert_eq!(s.clone_dtoh(&z).unwrap(), vec![0f32; 10]);
        let poisoned = unsafe { s.alloc::<u8>(7) }.unwrap();
        assert_eq!(s.clone_dtoh(&poisoned).unwrap(), vec![0xCD; 7], "poison fill");
        let host: Vec<i32> = (0..100).collect();
        let mut d = s.clone_htod(&host).unwrap();
        assert_eq!(s.clone_dtoh(&d).unwrap(), host);
        assert_eq!(s.clone_dtoh(&d.slice(10..20)).unwrap(), host[10..20].to_vec());
        s.memset_zeros(&mut d.slice_mut(5..8)).unwrap();
        s.memcpy_htod(&[7i32, 8, 9], &mut d.slice_mut(90..93)).unwrap();
        let back = s.clone_dtoh(&d).unwrap();
        assert_eq!(&back[4..9], &[4, 0, 0, 0, 8]);
        assert_eq!(&back[89..94], &[89, 7, 8, 9, 93]);
        let d2 = d.try_clone().unwrap();
        assert_eq!(s.clone_dtoh(&d2).unwrap(), back);
        let v = d.slice(50..);
        let d3 = s.clone_dtod(&v.slice(0..3)).unwrap();
        assert_eq!(s.clone_dtoh(&d3).unwrap(), vec![50, 51, 52]);
        let empty = s.clone_htod::<f32, _>(&[]).unwrap();
        assert!(s.clone_dtoh(&empty).unwrap().is_empty());
        let n = s.null::<f32>().unwrap();
        assert_eq!(n.len(), 0);
        let (free1, _) = ctx.mem_get_info().unwrap();
        assert!(free1 < free0);
    }
    assert_eq!(ctx.mem_get_info().unwrap().0, free0, "everything freed");
    println!("memory ok");

    // Events and timing.
    let e0 = s
        .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let e1 = s
        .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    let ms = e0.elapsed_ms(&e1).unwrap();
    assert!(ms >= 4.0 && ms < 1000.0, "elapsed {ms}");
    e1.synchronize().unwrap();
    assert!(e1.is_complete());
    let untimed = s.record_event(None).unwrap();
    assert!(e0.elapsed_ms(&untimed).is_err(), "DISABLE_TIMING event");
    println!("events ok ({ms:.2} ms)");

    // The real bias_update kernel module, compiled by NVRTC, on the stub.
    let counts_h: Vec<i64> = vec![5, 1, 3, 3, 0, 9, 3, 0];
    let bias_h: Vec<f32> = vec![0.0, 1.0, -1.0, 0.5, 0.25, 2.0, 0.0, -0.5];
    let mut want = bias_h.clone();
    moe_router::ops::update_expert_bias(&mut want, &counts_h, 0.125).unwrap();
    {
        let _f = be.function("bias_update", "update_expert_bias").unwrap();
        let mut bias = s.clone_htod(&bias_h).unwrap();
        let counts = s.clone_htod(&counts_h).unwrap();
        bias_update::update_expert_bias_cuda(&be, &mut bias.as_view_mut(), &counts.as_view(), 0.125)
            .unwrap();
        assert_eq!(s.clone_dtoh(&bias).unwrap(), want);
    }
    println!("update_expert_bias_cuda ok");

    // Borrowed stream (a stream of this context) and raw pointers (upgrade_device_ptr +
    // leak), as the Python entry points use them.
    {
        let other = ctx.new_stream().unwrap();
        let bias = other.clone_htod(&bias_h).unwrap();
        let counts = other.clone_htod(&counts_h).unwrap();
        let (bp, _g1) = bias.device_ptr(&other);
        let (cp, _g2) = counts.device_ptr(&other);
        unsafe {
            bias_update::update_expert_bias_raw(&be, other.cu_stream(), bp, cp, 8, 0.125)
                .unwrap();
        }
        drop((_g1, _g2));
        assert_eq!(other.clone_dtoh(&bias).unwrap(), want);
        let be2 = unsafe { be.on_borrowed_stream(other.cu_stream()) };
        let mut b2 = be2.stream().clone_htod(&bias_h).unwrap();
        let c2 = be2.stream().clone_htod(&counts_h).unwrap();
        bias_update::update_expert_bias_cuda(&be2, &mut b2.as_view_mut(), &c2.as_view(), 0.125)
            .unwrap();
        assert_eq!(be2.stream().clone_dtoh(&b2).unwrap(), want);
        let forked = other.fork().unwrap();
        forked.synchronize().unwrap();
        // Memory the driver never allocated (a host vector standing in for a
        // caller's buffer): allowed, with a one-time warning.
        let mut hb = bias_h.clone();
        let hc = counts_h.clone();
        unsafe {
            bias_update::update_expert_bias_raw(
                &be,
                other.cu_stream(),
                hb.as_mut_ptr() as u64,
                hc.as_ptr() as u64,
                8,
                0.125,
            )
            .unwrap();
        }
        assert_eq!(hb, want);
    }
    println!("borrowed stream / raw pointers ok");

    // Fake module: lookup rules, launch validation, out-of-bounds detection.
    {
        let m = ctx.load_module(Ptx::from_src(FAKE_PTX)).unwrap();
        assert!(m.load_function("not_emulated").is_err(), "no CPU version");
        assert!(m.load_function("not_in_ptx").is_err(), "not an entry");
        let fill = m.load_function("emu_test_fill").unwrap();
        let poke = m.load_function("emu_test_poke").unwrap();
        let fail = m.load_function("emu_test_fail").unwrap();
        assert_eq!(
            fill.get_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            )
            .unwrap(),
            49152
        );
        let mut buf = s.alloc_zeros::<f32>(16).unwrap();
        let n = 16i32;
        let v = 2.5f32;
        let mut b = s.launch_builder(&fill);
        b.arg(&mut buf).arg(&n).arg(&v);
        unsafe { b.launch(cfg(1, 32, 0)) }.unwrap();
        assert_eq!(s.clone_dtoh(&buf).unwrap(), vec![2.5f32; 16]);

        let mut bad = |c: LaunchConfig| {
            let mut b = s.launch_builder(&fill);
            b.arg(&mut buf).arg(&n).arg(&v);
            unsafe { b.launch(c) }
        };
        assert!(bad(cfg(1, 2048, 0)).is_err(), "2048 threads");
        assert!(bad(cfg(0, 32, 0)).is_err(), "empty grid");
        assert!(bad(cfg(1, 32, 60000)).is_err(), "smem above 48 KiB without opt-in");
        fill.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            60000,
        )
        .unwrap();
        bad(cfg(1, 32, 60000)).unwrap();
        assert!(bad(cfg(1, 32, 240000)).is_err(), "smem above the opt-in maximum");

        // Out of bounds by one byte past the end, then one byte before the start.
        let mut bytes = s.alloc_zeros::<u8>(100).unwrap();
        for off in [100i64, -1, 99] {
            let mut b = s.launch_builder(&poke);
            b.arg(&mut bytes).arg(&off);
            let r = unsafe { b.launch(cfg(1, 1, 0)) };
            println!("poke at {off}: {r:?}");
            assert_eq!(r.is_err(), off != 99, "poke at {off}");
        }
        let mut b = s.launch_builder(&fail);
        let r = unsafe { b.launch(cfg(1, 1, 0)) };
        println!("failing kernel: {r:?}");
        assert_eq!(
            r.unwrap_err().0,
            sys::cudaError_enum::CUDA_ERROR_LAUNCH_FAILED
        );
    }
    println!("fake module ok");

    // Range checks of copies (through the raw driver API; cudarc's safe API checks
    // lengths itself) and frees.
    unsafe {
        let d = s.alloc_zeros::<u8>(64).unwrap();
        let p = d.leak();
        let mut host = [0u8; 16];
        let r = sys::cuMemcpyDtoH_v2(host.as_mut_ptr() as *mut _, p + 56, 16);
        assert_eq!(r, sys::CUresult::CUDA_ERROR_INVALID_VALUE, "read past the end");
        let r = sys::cuMemcpyHtoD_v2(p - 8, host.as_ptr() as *const _, 16);
        assert_eq!(r, sys::CUresult::CUDA_ERROR_INVALID_VALUE, "write before the start");
        let r = sys::cuMemcpyDtoH_v2(host.as_mut_ptr() as *mut _, p + 48, 16);
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        let r = sys::cuMemsetD8_v2(p + 1, 0, 64);
        assert_eq!(r, sys::CUresult::CUDA_ERROR_INVALID_VALUE, "memset past the end");
        assert_eq!(sys::cuMemFree_v2(p + 4), sys::CUresult::CUDA_ERROR_INVALID_VALUE);
        assert_eq!(sys::cuMemFree_v2(p), sys::CUresult::CUDA_SUCCESS);
        assert_eq!(sys::cuMemFree_v2(p), sys::CUresult::CUDA_ERROR_INVALID_VALUE, "double free");
        let r = sys::cuMemcpyDtoH_v2(host.as_mut_ptr() as *mut _, p, 16);
        assert_eq!(r, sys::CUresult::CUDA_ERROR_INVALID_VALUE, "use after free");
        // A range the driver never allocated (a borrowed buffer): allowed, warned once.
        let mut foreign = vec![0u8; 32];
        let r = sys::cuMemcpyHtoD_v2(foreign.as_mut_ptr() as u64, host.as_ptr() as *const _, 16);
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "borrowed range");
        let mut name: *const std::ffi::c_char = std::ptr::null();
        assert_eq!(
            sys::cuGetErrorName(sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS, &mut name),
            sys::CUresult::CUDA_SUCCESS
        );
        assert_eq!(
            std::ffi::CStr::from_ptr(name).to_str().unwrap(),
            "CUDA_ERROR_ILLEGAL_ADDRESS"
        );
    }
    println!("range checks ok");

    drop(e0);
    drop(e1);
    drop(untimed);
    ctx.synchronize().unwrap();
    ctx.check_err().unwrap();
    drop(s);
    drop(ctx);
    drop(be);
    println!("driver_check: all ok");
}
